"""The device mesh and how arrays are laid out on it.

One 1-D mesh axis, `data`, spans every device of every process. Parameters
and BatchNorm statistics are replicated on it; batches, the SSPS queues and
the optimizer state of the large parameters (update_sharding.py) are split
along it. Each process feeds only its own slice of a global batch
(`global_batch`), so the same code runs on one host or on a pod.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"


def make_mesh(devices=None) -> Mesh:
    """All devices (or `devices`) on the `data` axis."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.array(devices), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def split_batch(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of a global batch -> global arrays split over `data`.

    Copied first: on the CPU, JAX wraps a host array without copying it, and grain's worker processes hand
    over batches in shared memory that is unlinked only when the array is freed. A JAX array wrapping it
    kept it alive to the end of the run, when grain no longer unlinks it and Python's resource tracker
    reported it as leaked ("resource_tracker: There appear to be N leaked shared_memory objects").
    """
    sharding = split_batch(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.array(v)) for k, v in local.items()}
