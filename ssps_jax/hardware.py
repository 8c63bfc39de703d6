"""What the accelerators can do, from their vendors' datasheets: peak FLOP/s, and HBM size and bandwidth of TPUs.

Used where a figure is turned into a fraction of the hardware: MFU in
`ssps-jax bench`, the roofline and the HBM fit of `ssps-jax compile`.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os

# Dense peak FLOP/s of one JAX device by compute dtype (bfloat16, float32), from the vendors' datasheets.
# The float32 figure is that of the unit XLA runs float32 matmuls and convolutions on at JAX's default
# precision: TF32 tensor cores on Ampere / Hopper GPUs, one bfloat16 pass on TPUs. The first name
# contained in the device kind wins, so more specific names come first.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 495e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12, 495e12),  # same compute as the H100 SXM (and GH200's Hopper)
    ("A100", 312e12, 156e12),  # SXM and PCIe
    ("TPU v4", 275e12, 275e12),
    ("TPU v5 lite", 197e12, 197e12),  # v5e
    ("TPU v5", 459e12, 459e12),  # v5p
    ("TPU v6 lite", 918e12, 918e12),  # v6e
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of one device of this kind computing in `dtype`; None if unknown (e.g. CPU)."""
    for name, bf16, fp32 in PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return bf16 if dtype == "bfloat16" else fp32
    return None


@dataclasses.dataclass(frozen=True)
class TPUChip:
    """One TPU chip (all its TensorCores): its memory, for the roofline and the memory check (compute: PEAK_FLOPS)."""

    generation: str
    hbm_bytes: float
    hbm_bytes_per_s: float


# Per chip, from the Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e):
# HBM capacity and bandwidth. Keys are JAX's device_kind.
TPU_CHIPS = (
    ("TPU v4", TPUChip("v4", 32 * 2**30, 1200e9)),
    ("TPU v5 lite", TPUChip("v5e", 16 * 2**30, 819e9)),
    ("TPU v5", TPUChip("v5p", 95 * 2**30, 2765e9)),
    ("TPU v6 lite", TPUChip("v6e", 32 * 2**30, 1640e9)),
)


def tpu_chip(device_kind: str) -> TPUChip:
    """The chip of a TPU device kind ("TPU v5 lite", ...); a ValueError names the kinds known."""
    for name, chip in TPU_CHIPS:
        if device_kind == name:
            return chip
    raise ValueError(f"no datasheet figures for {device_kind!r}: known {[name for name, _ in TPU_CHIPS]}")


def tpu_chips_attached() -> bool:
    """libtpu installed and TPU chips on this host (v4 / v5e show /dev/accel*, v5p / v6e /dev/vfio/<n>)."""
    chips = glob.glob("/dev/accel*") or [p for p in glob.glob("/dev/vfio/*") if os.path.basename(p).isdigit()]
    return bool(chips) and importlib.util.find_spec("libtpu") is not None


# libtpu on a host without TPU chips (installed by `make venv` for ahead-of-time compilation): no metadata
# server to ask, no TPU VM's worker list, no lock on chips that are not there. When JAX starts its backends
# it always tries the TPU one (priority 300, failing quietly); libtpu then reads the worker list and the
# accelerator type from the environment or the metadata server, and without either prints "could not
# determine TPU accelerator type" and "E0000 ... unexpected worker hostname" before it finds no chips. With
# these it starts quietly and JAX falls back to the CPU or GPU; `ssps-jax compile` loads libtpu for its
# topologies alike. Set before libtpu loads (ssps_jax/__init__.py: on import); values already in the
# environment win.
LIBTPU_OFF_TPU_ENV = {
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_WORKER_ID": "0",
    "TPU_ACCELERATOR_TYPE": "v5litepod-4",  # any valid name: `ssps-jax compile` passes its topology itself
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}


def quiet_libtpu_off_tpu() -> None:
    """Sets LIBTPU_OFF_TPU_ENV's defaults unless this host has TPU chips; call before JAX starts a backend."""
    if not tpu_chips_attached():
        for key, value in LIBTPU_OFF_TPU_ENV.items():
            os.environ.setdefault(key, value)
