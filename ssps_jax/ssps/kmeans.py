"""Spherical k-means on a queue sharded over devices (docs/method.md §4), and the neighbour table.

Per device, inside shard_map over the `data` axis:
  init     K rows of the *global* queue at seeded random global positions,
           contributed by the devices that hold them (a psum);
  E-step   assignment to the centroid of highest dot product: a matmul and an
           argmax over chunks of rows, so that memory stays at chunk x K;
  M-step   per-cluster sums and counts of the local rows (segment sums),
           summed over devices; centroid = mean, L2-normalised; a centroid
           with no rows keeps its previous value;
  10 iterations (a fori_loop: one compiled program), then one more E-step
  gives the final assignment of every row.
The result does not depend on how the queue is split: the init rows are
chosen by global position and the M-step sums are sums over all rows.

Neighbours: for every cluster, its M nearest *other* centroids by cosine
similarity (M = 0: the cluster itself), computed in row chunks of the K x K
similarity and spread over devices.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


def _chunked_rows(rows: int, columns: int, budget: int) -> int:
    """Rows per chunk so that a chunk x columns float32 block stays within `budget` elements."""
    return max(1, min(rows, budget // max(columns, 1)))


def assign(x: jnp.ndarray, centroids: jnp.ndarray, budget: int = 1 << 26) -> jnp.ndarray:
    """Index of the centroid of highest dot product for every row of x (R, D)."""
    rows = x.shape[0]
    chunk = _chunked_rows(rows, centroids.shape[0], budget)
    n_chunks = math.ceil(rows / chunk)
    padded = jnp.pad(x, ((0, n_chunks * chunk - rows), (0, 0)))
    best = lax.map(
        lambda c: jnp.argmax(c.astype(jnp.float32) @ centroids.T, axis=1),
        padded.reshape(n_chunks, chunk, -1),
    )
    return best.reshape(-1)[:rows].astype(jnp.int32)


def _normalise(x: jnp.ndarray) -> jnp.ndarray:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def kmeans(
    x: jnp.ndarray,
    valid: jnp.ndarray,
    global_positions: jnp.ndarray,
    key: jax.Array,
    num_clusters: int,
    iterations: int,
    total_rows: int,
    axis_name: str | None,
    budget: int = 1 << 26,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(centroids (K, D) identical on every device, assignment of each local row (R,)).

    x: this device's rows (R, D), L2-normalised; valid: (R,) rows that hold an
    entry (the others are ignored by the M-step); global_positions: (R,) their
    positions in the whole queue of `total_rows` rows.
    """
    # Init: K distinct random rows of the global queue, each sent by its owner.
    chosen = jax.random.permutation(key, total_rows)[:num_clusters]  # (K,)
    slot = jnp.full((total_rows,), num_clusters, jnp.int32).at[chosen].set(jnp.arange(num_clusters, dtype=jnp.int32))
    centroids = jnp.zeros((num_clusters, x.shape[1]), jnp.float32)
    centroids = centroids.at[slot[global_positions]].set(x.astype(jnp.float32), mode="drop")  # slot K: not chosen
    if axis_name is not None:
        centroids = lax.psum(centroids, axis_name)

    def m_step(_, centroids):
        labels = assign(x, centroids, budget)
        weight = valid.astype(jnp.float32)
        sums = jax.ops.segment_sum(x.astype(jnp.float32) * weight[:, None], labels, num_segments=num_clusters)
        counts = jax.ops.segment_sum(weight, labels, num_segments=num_clusters)
        if axis_name is not None:
            sums, counts = lax.psum((sums, counts), axis_name)
        means = sums / jnp.maximum(counts, 1.0)[:, None]
        return _normalise(jnp.where((counts > 0)[:, None], means, centroids))

    centroids = lax.fori_loop(0, iterations, m_step, centroids)
    return centroids, assign(x, centroids, budget)


def neighbours(
    centroids: jnp.ndarray, count: int, axis_name: str | None, axis_size: int = 1, budget: int = 1 << 26
) -> jnp.ndarray:
    """(K, max(count, 1)) indices: each cluster's `count` nearest other centroids, nearest first.

    With count = 0 the only neighbour of a cluster is itself (docs/method.md §4).
    Each device ranks K / axis_size clusters (K padded up to a multiple of it).
    """
    k = centroids.shape[0]
    if count == 0:
        return jnp.arange(k, dtype=jnp.int32)[:, None]
    per_device = math.ceil(k / axis_size)
    first = (lax.axis_index(axis_name) if axis_name is not None else 0) * per_device
    rows = first + jnp.arange(per_device)
    chunk = _chunked_rows(per_device, k, budget)
    n_chunks = math.ceil(per_device / chunk)
    rows = jnp.pad(rows, (0, n_chunks * chunk - per_device)).reshape(n_chunks, chunk)

    def rank(r):
        sims = centroids[jnp.minimum(r, k - 1)] @ centroids.T  # (chunk, K)
        sims = jnp.where(r[:, None] == jnp.arange(k)[None, :], -jnp.inf, sims)  # other centroids only
        return lax.top_k(sims, count)[1]

    table = lax.map(rank, rows).reshape(-1, count)[:per_device]
    if axis_name is not None:
        table = lax.all_gather(table, axis_name, tiled=True)
    return table[:k].astype(jnp.int32)
