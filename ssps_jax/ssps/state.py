"""SSPS device state: the memory queues (sharded) and the clustering (replicated).

Queue layout. A queue of capacity C (a multiple of the global batch G) is
stored as (C / G blocks, G rows) and split over devices along the *row*
axis: device d holds rows [d n, (d+1) n) of every block, n = G / devices.
Queue position p (docs/method.md §3) is block p // G, row p % G. The global
batch of step s is written at positions (s G) mod C, i.e. into block
s mod (C / G), row r for batch element r -- and batch element r lives on the
device that holds row r. So every write is local to its device (no
communication), and each device holds exactly 1 / devices of every queue.

  ref_index (C_ref/G, G)        dataset index of each reference row, -1: empty
  ref_emb   (C_ref/G, G, D_ref) y^: L2-normalised encoder output of the clean crop
  pos_index (C_pos/G, G)        dataset index of each positive-queue row
  pos_emb   (V, C_pos/G, G, D)  positive-branch embeddings (V views: 1 for SimCLR)
  assignment (N,)      cluster of each dataset index after the last k-means, -1: none
  centroids  (K, D_ref), neighbours (K, max(M, 1)), clustered_epoch ()
  speaker, session (N,)  labels for diagnostics only (-1: unknown); never trained on
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ssps_jax.sharding import DATA


@flax.struct.dataclass
class SSPSState:
    ref_index: jax.Array
    ref_emb: jax.Array
    pos_index: jax.Array
    pos_emb: jax.Array
    assignment: jax.Array
    centroids: jax.Array
    neighbours: jax.Array
    clustered_epoch: jax.Array
    speaker: jax.Array
    session: jax.Array


# Fields that only mean something together. A checkpoint restores a group only
# if every field of it has the shape this run expects (K, Q' or the dataset may
# have changed between runs); otherwise the group starts fresh -- for the
# clustering that means clustered_epoch = -1, i.e. cluster again. The labels
# (speaker, session) are never restored: they are this dataset's, read from its
# index file, not training state.
RESTORE_GROUPS = (
    ("ref_index", "ref_emb"),
    ("pos_index", "pos_emb"),
    ("assignment", "centroids", "neighbours", "clustered_epoch"),
)


def partition_specs() -> SSPSState:
    """How each field is laid out on the mesh: queues split along rows, the rest replicated."""
    rows = P(None, DATA)
    return SSPSState(
        ref_index=rows,
        ref_emb=rows,
        pos_index=rows,
        pos_emb=P(None, None, DATA),
        assignment=P(),
        centroids=P(),
        neighbours=P(),
        clustered_epoch=P(),
        speaker=P(),
        session=P(),
    )


def init_ssps_state(
    mesh: Mesh,
    *,
    dataset_size: int,
    global_batch: int,
    ref_capacity: int,
    pos_capacity: int,
    ref_dim: int,
    pos_dim: int,
    views: int,
    clusters: int,
    neighbours: int,
    dtype,
    speaker: np.ndarray,
    session: np.ndarray,
    abstract: bool = False,
) -> SSPSState:
    """Empty queues, created directly in their sharded layout (`abstract`: their shapes and shardings only)."""

    def make():
        return SSPSState(
            ref_index=jnp.full((ref_capacity // global_batch, global_batch), -1, jnp.int32),
            ref_emb=jnp.zeros((ref_capacity // global_batch, global_batch, ref_dim), dtype),
            pos_index=jnp.full((pos_capacity // global_batch, global_batch), -1, jnp.int32),
            pos_emb=jnp.zeros((views, pos_capacity // global_batch, global_batch, pos_dim), dtype),
            assignment=jnp.full((dataset_size,), -1, jnp.int32),
            centroids=jnp.zeros((clusters, ref_dim), jnp.float32),
            neighbours=jnp.zeros((clusters, max(neighbours, 1)), jnp.int32),
            clustered_epoch=jnp.array(-1, jnp.int32),
            speaker=jnp.asarray(speaker, jnp.int32),
            session=jnp.asarray(session, jnp.int32),
        )

    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), partition_specs())
    init = jax.jit(make, out_shardings=shardings)
    return init.eval_shape() if abstract else init()


def local_positions(blocks: int, local_rows: int, global_batch: int, device: jax.Array) -> jnp.ndarray:
    """Queue positions (block * G + row) of this device's (blocks, local_rows) entries, flattened."""
    block = jnp.arange(blocks)[:, None]
    row = device * local_rows + jnp.arange(local_rows)[None, :]
    return (block * global_batch + row).reshape(-1)


def write_block(queue: jax.Array, block: jax.Array, values: jax.Array, axis: int = 0) -> jax.Array:
    """Writes this device's batch rows `values` into `block` (along `axis`) of its queue shard."""
    start = [0] * queue.ndim
    start[axis] = block
    return jax.lax.dynamic_update_slice(queue, jnp.expand_dims(values, axis).astype(queue.dtype), start)
