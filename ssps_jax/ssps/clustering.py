"""Epoch-start clustering of the reference queue, as one jitted program over the mesh."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from ssps_jax.sharding import DATA
from ssps_jax.ssps import kmeans
from ssps_jax.ssps.state import SSPSState, local_positions, partition_specs


def _cluster(state: SSPSState, key: jax.Array, epoch: jax.Array, *, iterations: int, neighbours: int, budget: int):
    blocks, local_rows = state.ref_index.shape
    devices = lax.psum(1, DATA)
    device = lax.axis_index(DATA)
    global_batch = local_rows * devices
    x = state.ref_emb.reshape(blocks * local_rows, -1)
    index = state.ref_index.reshape(-1)
    positions = local_positions(blocks, local_rows, global_batch, device)
    centroids, labels = kmeans.kmeans(
        x, index >= 0, positions, key, state.centroids.shape[0], iterations, blocks * global_batch, DATA, budget
    )
    # Final assignment of every dataset index in the queue; -1 for the absent ones.
    size = state.assignment.shape[0]
    assignment = jnp.full((size,), -1, jnp.int32).at[jnp.where(index >= 0, index, size)].set(labels, mode="drop")
    assignment = lax.pmax(assignment, DATA)  # an index is in at most one row of the queue
    table = kmeans.neighbours(centroids, neighbours, DATA, lax.psum(1, DATA), budget)
    return state.replace(
        assignment=assignment, centroids=centroids, neighbours=table, clustered_epoch=epoch.astype(jnp.int32)
    )


def make_cluster_fn(mesh: Mesh, iterations: int, neighbours: int, budget: int = 1 << 26):
    """(ssps_state, key, epoch) -> ssps_state with a new clustering; donates the old state."""
    specs = partition_specs()
    fn = functools.partial(_cluster, iterations=iterations, neighbours=neighbours, budget=budget)
    sharded = jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(specs, jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec()),
        out_specs=specs,
        check_vma=False,
    )
    return jax.jit(sharded, donate_argnums=0)


def nmi(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Normalised mutual information, normalised by the mean entropy (scikit-learn's default)."""
    _, a = np.unique(labels, return_inverse=True)
    _, b = np.unique(clusters, return_inverse=True)
    if a.max() == 0 and b.max() == 0:
        return 1.0  # one class and one cluster: identical partitions
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1.0 / len(a))
    pa, pb = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    mutual = max(0.0, float(np.sum(joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz]))))
    mean_entropy = -(np.sum(pa * np.log(pa)) + np.sum(pb * np.log(pb))) / 2
    return mutual / mean_entropy if mean_entropy > 0 else 0.0
