"""What the clustering samplers (kmeans-repr, kmeans) share: their keys, their checks, the draw of c*.

Every epoch from start_epoch starts with k-means of the reference queue (K
clusters; ssps/clustering.py); anchor i's cluster is c = assignment[i], and
c* is drawn among the M nearest clusters of c (`neighbours`), uniformly or
with weights lambda exp(-lambda rank).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssps_jax.ssps.samplers.base import Sampler, SamplingConfig, rank_logits
from ssps_jax.ssps.state import SSPSState

PROBS = ("uniform", "exp")


class ClusteredSampler(Sampler):
    clustered = True

    def default_config(self) -> dict:
        return {
            "kmeans_clusters": 25000,  # K
            "kmeans_iterations": 10,
            "kmeans_chunk_elements": 1 << 26,  # bounds the E-step's rows x K similarity block
            "inter_sampling_size": 1,  # M: neighbour clusters to draw from (0: the anchor's own cluster)
            "inter_sampling_prob": "uniform",  # or "exp": lambda exp(-lambda rank)
            "inter_sampling_lambda": 0.7,
        }

    def validate(self, config, method, fail) -> None:
        s = config.ssps
        if s.inter_sampling_prob not in PROBS:
            fail("ssps.inter_sampling_prob", f"must be one of {PROBS}, got {s.inter_sampling_prob!r}")
        if s.kmeans_clusters < 1 or s.kmeans_iterations < 0 or s.inter_sampling_size < 0:
            fail("ssps", "kmeans_clusters >= 1, kmeans_iterations >= 0 and inter_sampling_size >= 0 are needed")
        if s.inter_sampling_size >= s.kmeans_clusters:
            fail("ssps.inter_sampling_size", f"{s.inter_sampling_size} must be < kmeans_clusters {s.kmeans_clusters}")
        if s.intra_sampling_prob != "uniform":
            # sslsv ranks kmeans-repr candidates in queue order, which carries no meaning.
            fail("ssps.intra_sampling_prob", "only 'uniform' is supported for the clustering variants")


def draw_clusters(state: SSPSState, anchors: jax.Array, keys: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """c* for each anchor: one of the neighbours of its cluster; -1 for unassigned anchors."""
    cluster = state.assignment[anchors]
    logits = rank_logits(state.neighbours.shape[1], cfg.inter_exp, cfg.inter_lambda)
    slot = jax.vmap(lambda k: jax.random.categorical(jax.random.fold_in(k, 0), logits))(keys)
    return jnp.where(cluster >= 0, state.neighbours[jnp.maximum(cluster, 0), slot], -1)
