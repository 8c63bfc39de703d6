"""Pseudo-positive sampling on device, vectorised over the batch (docs/method.md §5).

Runs per device inside the train step's shard_map. Anchor b of the global
batch draws with its own key, fold_in(step key, b), so draws do not depend
on which device an anchor is on.

kmeans-repr (SSPS-Clustering)
  c = assignment[i]; c* drawn among the M neighbours of c (uniform, or
  lambda exp(-lambda rank)); candidates = positive-queue rows whose dataset
  index is assigned to c*, on *all* devices. Sampling is exactly uniform over
  them: every device counts its candidates for every anchor, the counts are
  gathered (B x devices integers), a rank r in [0, total) is drawn, and the
  device holding candidate r contributes its embedding. Contributions are
  combined with a reduce-scatter, so only the chosen embeddings move, each to
  its anchor's device.
kmeans (centroid)
  the centroid of c* replaces the positive.
knn (SSPS-NN)
  similarity of y^_i to every row of the reference queue aligned with the
  positive queue, rows of index i excluded; per-device top-M, gathered and
  merged into the global top-M; one of them drawn (uniform or exponential
  over rank); its embedding travels like above.
oracle (a diagnostic, not a method)
  candidates = positive-queue rows whose speaker label is the anchor's and
  whose session label differs (labels from the index file, SSPSState.speaker
  / session); one drawn uniformly over all devices, exactly as kmeans-repr
  draws within c*. It measures the headroom of any positive sampling. With
  oracle_purity p < 1, an anchor draws a right positive with probability p and
  otherwise a labelled row of another speaker, uniformly: an SSPS whose
  pseudo-labels are right p of the time, to find the p that pays off.
Anchors without cluster or candidate keep their ordinary positive (mask False).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ssps_jax.ssps.state import SSPSState, local_positions

METHODS = ("kmeans-repr", "kmeans", "knn", "oracle")
CLUSTERED = ("kmeans-repr", "kmeans")  # the variants that need the epoch-start k-means


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    method: str = "kmeans-repr"
    inter_size: int = 1  # M for the clustering variants: neighbours to draw c* from
    inter_exp: bool = False
    inter_lambda: float = 0.7
    intra_size: int = 1  # M for knn: nearest queue rows to draw from
    intra_exp: bool = False
    intra_lambda: float = 0.7
    oracle_purity: float = 1.0  # oracle: share of anchors drawing a right positive (the others: another speaker)


class Sample(NamedTuple):
    embeddings: jax.Array  # (V, n, D) pseudo-positives of this device's anchors
    mask: jax.Array  # (n,) anchors that got one
    index: jax.Array  # (n,) dataset index of the chosen queue row (-1: none, or a centroid)


def rank_logits(size: int, exponential: bool, lam: float) -> jnp.ndarray:
    """Log-weights over ranks 0..size-1: uniform, or lambda exp(-lambda rank) (normalised by sampling)."""
    ranks = jnp.arange(size, dtype=jnp.float32)
    return -lam * ranks if exponential else jnp.zeros_like(ranks)


def _anchor_keys(key: jax.Array, count: int, offset=0) -> jax.Array:
    return jax.vmap(lambda b: jax.random.fold_in(key, b))(offset + jnp.arange(count))


def _draw_clusters(state: SSPSState, anchors: jax.Array, keys: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """c* for each anchor: one of the neighbours of its cluster; -1 for unassigned anchors."""
    cluster = state.assignment[anchors]
    logits = rank_logits(state.neighbours.shape[1], cfg.inter_exp, cfg.inter_lambda)
    slot = jax.vmap(lambda k: jax.random.categorical(jax.random.fold_in(k, 0), logits))(keys)
    return jnp.where(cluster >= 0, state.neighbours[jnp.maximum(cluster, 0), slot], -1)


def _fetch(pos_emb: jax.Array, pos_index: jax.Array, entry: jax.Array, mine: jax.Array, axis: str):
    """Embeddings and dataset indices of local rows `entry` (G,) where `mine`, sent to each anchor's device."""
    views = pos_emb.shape[0]
    flat = pos_emb.reshape(views, -1, pos_emb.shape[-1])
    emb = jnp.where(mine[None, :, None], flat[:, entry], 0).astype(jnp.float32)
    emb = lax.psum_scatter(emb, axis, scatter_dimension=1, tiled=True)
    index = jnp.where(mine, pos_index.reshape(-1)[entry] + 1, 0)
    return emb, lax.psum_scatter(index, axis, scatter_dimension=0, tiled=True) - 1


def _local_slice(x: jax.Array, axis: str, n: int) -> jax.Array:
    return lax.dynamic_slice_in_dim(x, lax.axis_index(axis) * n, n)


def sample_kmeans_repr(state: SSPSState, anchors_local: jax.Array, key: jax.Array, cfg: SamplingConfig, axis: str):
    n = anchors_local.shape[0]
    device = lax.axis_index(axis)
    anchors = lax.all_gather(anchors_local, axis, tiled=True)  # (G,) the global batch
    keys = _anchor_keys(key, anchors.shape[0])
    target = _draw_clusters(state, anchors, keys, cfg)  # (G,)

    # This device's candidates for every anchor: rows sorted by cluster, one range per anchor.
    entry_index = state.pos_index.reshape(-1)
    entry_cluster = jnp.where(entry_index >= 0, state.assignment[jnp.maximum(entry_index, 0)], -1)
    order = jnp.argsort(entry_cluster, stable=True)
    sorted_cluster = entry_cluster[order]
    start = jnp.searchsorted(sorted_cluster, target, side="left")
    count = jnp.where(target >= 0, jnp.searchsorted(sorted_cluster, target, side="right") - start, 0)

    counts = lax.all_gather(count, axis)  # (devices, G)
    total = jnp.sum(counts, axis=0)
    before = jnp.cumsum(counts, axis=0)[device] - counts[device]  # candidates on earlier devices
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1)))(keys)
    rank = jnp.minimum(jnp.floor(u * total).astype(jnp.int32), jnp.maximum(total - 1, 0))
    mine = (total > 0) & (rank >= before) & (rank < before + count)
    entry = order[jnp.clip(start + rank - before, 0, entry_index.shape[0] - 1)]
    emb, index = _fetch(state.pos_emb, state.pos_index, entry, mine, axis)
    return Sample(emb, _local_slice(total > 0, axis, n), index)


def sample_oracle(state: SSPSState, anchors_local: jax.Array, key: jax.Array, axis: str, purity: float = 1.0):
    n = anchors_local.shape[0]
    device = lax.axis_index(axis)
    anchors = lax.all_gather(anchors_local, axis, tiled=True)  # (G,)
    keys = _anchor_keys(key, anchors.shape[0])
    speaker, session = state.speaker[anchors], state.session[anchors]

    # This device's candidates for every anchor: a (G, local rows) match table. Same speaker, other
    # session: the anchor's own row (same session) is never a candidate; unlabelled anchors have none.
    entry_index = state.pos_index.reshape(-1)
    safe = jnp.maximum(entry_index, 0)
    labelled = (entry_index[None, :] >= 0) & (speaker[:, None] >= 0) & (state.speaker[safe][None, :] >= 0)
    same_speaker = state.speaker[safe][None, :] == speaker[:, None]
    right = same_speaker & (state.session[safe][None, :] != session[:, None])
    if purity < 1:  # a static choice: the default program is the plain oracle's
        wrong = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 2)))(keys) >= purity
        match = labelled & jnp.where(wrong[:, None], ~same_speaker, right)
    else:
        match = labelled & right
    # Candidates are ranked in queue-position order (block, then global row), so a draw does not depend
    # on how the rows are split over devices: gather every (device, block) count, offset this device's.
    blocks = state.pos_index.shape[0]
    match = match.reshape(-1, blocks, n)  # (G, blocks, local rows)
    count = jnp.sum(match, axis=2)  # (G, blocks)
    counts = lax.all_gather(count, axis, axis=2)  # (G, blocks, devices)
    flat = counts.reshape(counts.shape[0], -1)
    total = jnp.sum(flat, axis=1)
    before = (jnp.cumsum(flat, axis=1) - flat).reshape(counts.shape)[:, :, device]  # (G, blocks)
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1)))(keys)
    rank = jnp.minimum(jnp.floor(u * total).astype(jnp.int32), jnp.maximum(total - 1, 0))
    position = before[:, :, None] + jnp.cumsum(match, axis=2) - 1  # global rank of each local candidate
    hit = (match & (position == rank[:, None, None])).reshape(match.shape[0], -1)
    mine = jnp.any(hit, axis=1)
    entry = jnp.argmax(hit, axis=1)
    emb, index = _fetch(state.pos_emb, state.pos_index, entry, mine, axis)
    return Sample(emb, _local_slice(total > 0, axis, n), index)


def sample_kmeans_centroid(state: SSPSState, anchors_local: jax.Array, key: jax.Array, cfg: SamplingConfig, axis: str):
    n = anchors_local.shape[0]
    keys = _anchor_keys(key, n, offset=lax.axis_index(axis) * n)
    target = _draw_clusters(state, anchors_local, keys, cfg)
    emb = state.centroids[jnp.maximum(target, 0)][None]
    return Sample(emb, target >= 0, jnp.full((n,), -1, jnp.int32))


def sample_knn(
    state: SSPSState, anchors_local: jax.Array, y_ref_local: jax.Array, key: jax.Array, cfg: SamplingConfig, axis: str
):
    n = anchors_local.shape[0]
    device = lax.axis_index(axis)
    anchors = lax.all_gather(anchors_local, axis, tiled=True)
    y = lax.all_gather(y_ref_local, axis, tiled=True).astype(jnp.float32)  # (G, D)
    global_batch = anchors.shape[0]
    blocks = state.ref_index.shape[0]
    ref_index = state.ref_index.reshape(-1)
    sims = y @ state.ref_emb.reshape(ref_index.shape[0], -1).astype(jnp.float32).T  # (G, E)
    valid = (ref_index[None, :] >= 0) & (ref_index[None, :] != anchors[:, None])
    sims = jnp.where(valid, sims, -jnp.inf)
    m = min(cfg.intra_size, ref_index.shape[0])
    values, local = lax.top_k(sims, m)  # (G, m)
    positions = local_positions(blocks, n, global_batch, device)[local]
    # Merge the devices' top-m into the global top-M.
    values = jnp.moveaxis(lax.all_gather(values, axis), 0, 1).reshape(global_batch, -1)
    positions = jnp.moveaxis(lax.all_gather(positions, axis), 0, 1).reshape(global_batch, -1)
    size = min(cfg.intra_size, values.shape[1])
    values, best = lax.top_k(values, size)
    positions = jnp.take_along_axis(positions, best, axis=1)
    available = jnp.sum(jnp.isfinite(values), axis=1)
    logits = jnp.where(
        jnp.arange(size)[None] < available[:, None], rank_logits(size, cfg.intra_exp, cfg.intra_lambda), -jnp.inf
    )
    keys = _anchor_keys(key, global_batch)
    pick = jax.vmap(lambda k, lg: jax.random.categorical(jax.random.fold_in(k, 2), lg))(keys, logits)
    chosen = positions[jnp.arange(global_batch), pick]
    row = chosen % global_batch
    mine = (available > 0) & (row // n == device)
    entry = (chosen // global_batch) * n + row % n
    emb, index = _fetch(state.pos_emb, state.pos_index, jnp.clip(entry, 0, ref_index.shape[0] - 1), mine, axis)
    return Sample(emb, _local_slice(available > 0, axis, n), index)


def sample(state: SSPSState, anchors_local, y_ref_local, key, cfg: SamplingConfig, axis: str) -> Sample:
    if cfg.method == "kmeans-repr":
        return sample_kmeans_repr(state, anchors_local, key, cfg, axis)
    if cfg.method == "kmeans":
        return sample_kmeans_centroid(state, anchors_local, key, cfg, axis)
    if cfg.method == "oracle":
        return sample_oracle(state, anchors_local, key, axis, cfg.oracle_purity)
    return sample_knn(state, anchors_local, y_ref_local, key, cfg, axis)
