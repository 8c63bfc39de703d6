"""knn (SSPS-NN): one of the M reference-queue rows nearest the anchor's y^.

The similarity of y^_i to every row of the reference queue (aligned with the
positive queue: the same Q' rows), rows of index i excluded; per-device top-M,
gathered and merged into the global top-M; one of them drawn (uniform or
lambda exp(-lambda rank)); the positive-queue row at the same place travels to
the anchor's device as in kmeans-repr. No clustering.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ssps_jax.ssps.samplers.base import Sample, Sampler, anchor_keys, fetch, local_slice, rank_logits
from ssps_jax.ssps.samplers.clustered import PROBS
from ssps_jax.ssps.state import local_positions


class KNN(Sampler):
    name = "knn"
    summary = "SSPS-NN: the positive-queue row beside one of the M reference rows nearest the anchor's y^"

    def default_config(self) -> dict:
        return {
            "intra_sampling_size": 1,  # M: draw among the top-M queue rows
            "intra_sampling_prob": "uniform",  # or "exp": lambda exp(-lambda rank)
            "intra_sampling_lambda": 0.7,
        }

    def validate(self, config, method, fail) -> None:
        s = config.ssps
        if s.intra_sampling_prob not in PROBS:
            fail("ssps.intra_sampling_prob", f"must be one of {PROBS}, got {s.intra_sampling_prob!r}")
        if s.intra_sampling_size < 1:
            fail("ssps.intra_sampling_size", f"must be >= 1, got {s.intra_sampling_size}")

    def sample(self, state, anchors_local, y_ref_local, key, cfg, axis) -> Sample:
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
        keys = anchor_keys(key, global_batch)
        pick = jax.vmap(lambda k, lg: jax.random.categorical(jax.random.fold_in(k, 2), lg))(keys, logits)
        chosen = positions[jnp.arange(global_batch), pick]
        row = chosen % global_batch
        mine = (available > 0) & (row // n == device)
        entry = (chosen // global_batch) * n + row % n
        emb, index = fetch(state.pos_emb, state.pos_index, jnp.clip(entry, 0, ref_index.shape[0] - 1), mine, axis)
        return Sample(emb, local_slice(available > 0, axis, n), index)


SAMPLER = KNN()
