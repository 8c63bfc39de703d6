"""Timing helpers: compile once, then the median of synchronised repeats; XLA's messages kept off the screen."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator

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


@contextlib.contextmanager
def messages_to(path: str) -> Iterator[dict]:
    """Sends everything written to this process's stderr (file descriptor 2) to the file `path` while inside.

    XLA's C++ code logs there directly: a float32 benchmark near the device's
    memory prints a screen of `hlo_rematerialization` and `bfc_allocator`
    warnings while it compiles and runs the k-means and the steps, which say
    nothing about the figures. Yields a dict whose "lines" is set on exit to
    the number of lines the file gained.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    out = {"lines": 0}
    with open(path, "ab") as f:
        start = f.tell()
        os.dup2(f.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            f.flush()
    with open(path, "rb") as f:
        f.seek(start)
        out["lines"] = f.read().count(b"\n")
