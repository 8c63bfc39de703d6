"""Timing helpers: compile once, then the median of synchronised repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def timed(fn: Callable[[], object]) -> float:
    """Seconds of one call, waiting for every device result."""
    started = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - started


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(seconds of the first call, median seconds of `repeats` later calls)."""
    first = timed(fn)
    for _ in range(warmup - 1):
        timed(fn)
    return first, statistics.median(timed(fn) for _ in range(repeats))


def devices_line() -> str:
    """What the numbers were measured on."""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    where = f"{jax.default_backend()}, {jax.process_count()} process(es), jax {jax.__version__}"
    return f"{len(devices)} x {', '.join(kinds)} ({where})"
