"""Joining JAX's multi-process runtime (`jax.distributed`) when launched as one of several processes.

`initialize()` is called by the commands before anything touches a device:
  * `JAX_COORDINATOR_ADDRESS` set (host:port of process 0): the standard
    settings, with `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (and optionally
    `JAX_LOCAL_DEVICE_IDS`), e.g. one process per host of a GPU cluster;
  * a Cloud TPU VM (libtpu installed and TPU chips present: /dev/accel* or
    /dev/vfio/N; libtpu alone is no sign, `ssps-jax compile` uses it on any
    host), or a Slurm / Open MPI job of several tasks:
    `jax.distributed.initialize()` with JAX's own detection of the
    coordinator, process count and id;
  * otherwise nothing: one process that sees all local devices.
After it, `jax.devices()` lists the devices of every process and the `data`
mesh spans them all; each process feeds its own slice of every global batch.
On CPU the collectives between processes are gloo's (JAX's default).
"""

from __future__ import annotations

import logging
import os

import jax

from ssps_jax import hardware

logger = logging.getLogger(__name__)


def _several_tasks() -> bool:
    return any(int(os.environ.get(k, "1") or 1) > 1 for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def initialize() -> bool:
    """Joins the multi-process runtime if this process is part of one; True if it is."""
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(k)]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} is not")
        jax.distributed.initialize(num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
    elif hardware.tpu_chips_attached() or _several_tasks():
        try:
            jax.distributed.initialize()  # JAX detects Cloud TPU slices, Slurm and Open MPI
        except ValueError as e:  # nothing detected (e.g. libtpu installed off a TPU VM)
            logger.warning("no multi-process environment detected (%s): running as one process", e)
            return False
    else:
        return False
    logger.info("process %d of %d, %d devices in all", jax.process_index(), jax.process_count(), jax.device_count())
    return True
