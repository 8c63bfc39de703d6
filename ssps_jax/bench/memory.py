"""Peak memory of `ssps-jax bench`.

Peak device memory over the whole run, k-means included
(`memory_stats()["peak_bytes_in_use"]`, max over local devices); where a
backend has none (CPU), the process's peak RSS, labelled as host memory.
"""

from __future__ import annotations

import resource

import jax


def peak_memory() -> tuple[int, str]:
    """(bytes, what they are): peak device memory where the backend reports it, else the host's peak RSS."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    if all(s and "peak_bytes_in_use" in s for s in stats):
        return max(s["peak_bytes_in_use"] for s in stats), "device peak, max over local devices"
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host peak RSS (no device memory statistics)"
