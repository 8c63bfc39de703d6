"""The k-means size of `ssps-jax bench`: the reference queue rows N and clusters K, and why.

Paper scale (N = 1 092 009, K = the config's, 25 000 in the paper configs) or
the largest N that fits the device memory; on CPU
docs/method.md §11's comparison point (N = 100 000, K = 5 000). What ran,
and why, is printed. The step's queues are made at the same N.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

PAPER_N, PAPER_K, PAPER_D = 1_092_009, 25_000, 512  # VoxCeleb2 train utterances, prototypes, encoder_dim
CPU_N, CPU_K = 100_000, 5_000  # docs/method.md §11's CPU comparison point with sslsv


def kmeans_size(
    config: ml_collections.ConfigDict, mesh, n: int | None, k: int | None, pos_bytes: int
) -> tuple[int, int, str]:
    """(N, K, why): the reference queue rows and clusters of the k-means run (and of the queues the step uses)."""
    if n and k:
        return n, k, "as asked (--kmeans-n, --kmeans-k)"
    if jax.default_backend() == "cpu":
        n, k = n or CPU_N, k or CPU_K
        paper = 11 * 2 * PAPER_N * PAPER_K * PAPER_D
        why = (
            f"CPU backend: the paper size (N {PAPER_N}, K {PAPER_K}, D {PAPER_D}) is {paper:.1e} FLOP of E-steps "
            "alone, hours on a few cores; this is docs/method.md §11's CPU comparison point with sslsv "
            "(--kmeans-n/--kmeans-k to change it)"
        )
        return n, k, why
    n, k = n or PAPER_N, k or config.ssps.kmeans_clusters
    stats = [d.memory_stats() for d in jax.local_devices()]
    if not all(s and "bytes_limit" in s for s in stats):
        return n, k, "paper scale (no device memory statistics to check it against)"
    free = min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
    itemsize = jnp.dtype(config.ssps.queue_dtype).itemsize
    d, budget = config.model.encoder_dim, config.ssps.kmeans_chunk_elements

    def need(rows: int) -> float:
        # Per device: the queue's share, replicated per-index arrays (assignment, labels), centroids and
        # their sums, the E-step's chunk x K block twice; half the free memory is left for the train step.
        return rows * (d * itemsize + 4) / mesh.size + 12 * rows + 3 * k * d * 4 + 8 * budget + pos_bytes

    asked = n
    while need(n) > free / 2 and n > 2 * max(k, config.train.global_batch_size):
        n //= 2
    if n == asked:
        return n, k, "paper scale" if asked == PAPER_N else "as asked"
    return n, k, f"largest N that fits: N {asked} needs about {need(asked) / 2**30:.1f} GiB of {free / 2**30:.1f} free"
