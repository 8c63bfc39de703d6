"""The SSPS part of a train step, shared by every framework (per device, inside shard_map).

docs/method.md §3 and §5, in the epochs where the queues are live
(`start_epoch - 1` on):
  `pseudo_positives`  draws a pseudo-positive for every anchor of the batch;
                      the mask says which anchors replace their positive with
                      it (`SSPS.sampling_on`: from `start_epoch` on, and for the
                      clustering variants once that epoch's clustering is in
                      the state);
  `enqueue`           writes the batch's (index, y^) into the reference queue
                      and (index, positive-branch embeddings) into the
                      positive queue, at block `step_in_epoch` of each (queue
                      position (step_in_epoch * G) mod capacity), each device
                      into its own rows.
The y^ themselves (encoder or teacher output of the clean reference crop) are
the framework's to compute; `normalise` makes them unit vectors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax

from ssps_jax.ssps import sampling
from ssps_jax.ssps.state import SSPSState, write_block

if TYPE_CHECKING:
    from ssps_jax.ssps.lifecycle import SSPS


def normalise(y: jax.Array) -> jax.Array:
    """L2-normalised rows, as a constant (no gradient flows into the queues)."""
    return lax.stop_gradient(y / jnp.maximum(jnp.linalg.norm(y, axis=-1, keepdims=True), 1e-12))


def pseudo_positives(
    queues: SSPSState, step: jax.Array, index: jax.Array, y_ref: jax.Array, rng: jax.Array, ssps: SSPS, axis: str
) -> tuple[jax.Array, jax.Array, dict]:
    """(embeddings (V, n, D) as constants, replace mask (n,), diagnostics) for this device's anchors.

    `rng` is the step key shared by all devices (draws are keyed by global
    batch position, so they do not depend on the device count).
    """
    sample = sampling.sample(queues, index, y_ref, rng, ssps.sampling, axis)
    mask = sample.mask & ssps.sampling_on(step // ssps.steps_per_epoch, queues.clustered_epoch)
    return lax.stop_gradient(sample.embeddings), mask, _metrics(queues, index, y_ref, sample, mask, axis)


def enqueue(
    queues: SSPSState, step: jax.Array, steps_per_epoch: int, index: jax.Array, y_ref: jax.Array, positives: jax.Array
) -> SSPSState:
    """Queues with this device's batch written in: y^ (n, D_ref), positives (V, n, D)."""
    step_in_epoch = step % steps_per_epoch
    ref_block = step_in_epoch % queues.ref_index.shape[0]
    pos_block = step_in_epoch % queues.pos_index.shape[0]
    return queues.replace(
        ref_index=write_block(queues.ref_index, ref_block, index),
        ref_emb=write_block(queues.ref_emb, ref_block, y_ref),
        pos_index=write_block(queues.pos_index, pos_block, index),
        pos_emb=write_block(queues.pos_emb, pos_block, lax.stop_gradient(positives), axis=1),
    )


def _metrics(
    queues: SSPSState, anchors: jax.Array, y_ref: jax.Array, sample: sampling.Sample, mask: jax.Array, axis: str
) -> dict:
    """Coverage, how often pseudo-positives share the anchor's speaker / session (labels), and two label-free
    cosines in the reference space (docs/method.md §5): anchor y^ to the centroid of its own cluster and to the
    centroid of its pseudo-positive's cluster, averaged over the anchors that have both."""
    replaced = lax.psum(jnp.sum(mask), axis)
    metrics = {"ssps/coverage": replaced / lax.psum(mask.shape[0], axis)}
    found = mask & (sample.index >= 0)
    own = queues.assignment[anchors]
    theirs = queues.assignment[jnp.maximum(sample.index, 0)]
    both = found & (own >= 0) & (theirs >= 0)
    count = lax.psum(jnp.sum(both), axis)
    y = y_ref.astype(jnp.float32)
    for name, cluster in (("own_cluster_cos", own), ("pseudo_cluster_cos", theirs)):
        cos = jnp.sum(y * queues.centroids[jnp.maximum(cluster, 0)].astype(jnp.float32), axis=-1)
        total = lax.psum(jnp.sum(jnp.where(both, cos, 0.0)), axis)
        metrics[f"ssps/{name}"] = jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)
    for name, labels in (("speaker", queues.speaker), ("session", queues.session)):
        known = found & (labels[anchors] >= 0)
        same = known & (labels[anchors] == labels[jnp.maximum(sample.index, 0)])
        total = lax.psum(jnp.sum(known), axis)
        metrics[f"ssps/same_{name}"] = jnp.where(
            total > 0, lax.psum(jnp.sum(same), axis) / jnp.maximum(total, 1), jnp.nan
        )
    return metrics
