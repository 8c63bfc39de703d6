"""kmeans-repr (SSPS-Clustering, the papers' main setting): a queue row of a neighbouring cluster.

c* is drawn among the M neighbours of the anchor's cluster (samplers/clustered.py);
the candidates are the positive-queue rows whose dataset index is assigned to c*,
on *all* devices. Sampling is exactly uniform over them: every device counts its
candidates for every anchor, the counts are gathered (B x devices integers), a
rank r in [0, total) is drawn, and the device holding candidate r contributes its
embedding. Contributions are combined with a reduce-scatter, so only the chosen
embeddings move, each to its anchor's device. Anchors without cluster or
candidate keep their ordinary positive (mask False).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ssps_jax.ssps.samplers.base import Sample, anchor_keys, fetch, local_slice
from ssps_jax.ssps.samplers.clustered import ClusteredSampler, draw_clusters


class KMeansRepr(ClusteredSampler):
    name = "kmeans-repr"
    summary = "SSPS-Clustering: a positive-queue row of one of the M clusters nearest the anchor's"

    def sample(self, state, anchors_local, y_ref_local, key, cfg, axis) -> Sample:
        n = anchors_local.shape[0]
        device = lax.axis_index(axis)
        anchors = lax.all_gather(anchors_local, axis, tiled=True)  # (G,) the global batch
        keys = anchor_keys(key, anchors.shape[0])
        target = draw_clusters(state, anchors, keys, cfg)  # (G,)

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
        emb, index = fetch(state.pos_emb, state.pos_index, entry, mine, axis)
        return Sample(emb, local_slice(total > 0, axis, n), index)


SAMPLER = KMeansRepr()
