"""kmeans (SSPS with centroids): the centroid of the drawn cluster c* replaces the positive.

A centroid is a mean of y^, an encoder output: it can only stand where the
method's positive branch is an embedding of that space (`Method.reference_misfit`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ssps_jax.ssps.samplers.base import Sample, anchor_keys
from ssps_jax.ssps.samplers.clustered import ClusteredSampler, draw_clusters


class KMeansCentroid(ClusteredSampler):
    name = "kmeans"
    summary = "the centroid of one of the M clusters nearest the anchor's (an encoder-space embedding)"

    def validate(self, config, method, fail) -> None:
        super().validate(config, method, fail)
        if misfit := method.reference_misfit(config):
            fail("ssps.sampling", f"'kmeans' puts a centroid of encoder outputs in place of {misfit}")

    def sample(self, state, anchors_local, y_ref_local, key, cfg, axis) -> Sample:
        n = anchors_local.shape[0]
        keys = anchor_keys(key, n, offset=lax.axis_index(axis) * n)
        target = draw_clusters(state, anchors_local, keys, cfg)
        emb = state.centroids[jnp.maximum(target, 0)][None]
        return Sample(emb, target >= 0, jnp.full((n,), -1, jnp.int32))


SAMPLER = KMeansCentroid()
