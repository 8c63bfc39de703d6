"""What a pseudo-positive sampler is to the rest of the system, and the pieces samplers share.

A sampler is one module (ssps/samplers/knn.py, ...) exposing one `Sampler`
object, registered by name in ssps/sampling.py. Its `sample` runs per
device inside the train step's shard_map, vectorised over the batch: anchor
b of the global batch draws with its own key, fold_in(step key, b), so
draws do not depend on which device an anchor is on. The rest of the
system asks the object its config keys and their defaults, their checks,
whether it needs the epoch-start clustering, and whether it needs labels;
nothing else branches on `config.ssps.sampling`.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from ssps_jax.ssps.state import SSPSState

if TYPE_CHECKING:
    from ssps_jax.methods.base import Method

# Raised with (key, message): the config validator turns it into a ConfigError naming the key.
Fail = Callable[[str, str], None]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """The sampling settings of `config.ssps` (static: part of the compiled step)."""

    method: str = "kmeans-repr"  # the sampler's name (config.ssps.sampling)
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


class Sampler(abc.ABC):
    """A way to draw each anchor's pseudo-positive from the SSPS queues (docs/method.md §5)."""

    name: str  # config.ssps.sampling
    summary: str  # one line: what it draws
    # Needs the epoch-start k-means of the reference queue: the reference queue then holds one epoch (else it
    # is aligned with the positive queue, Q' rows) and sampling waits for the epoch's clustering.
    clustered: bool = False
    # Draws by the index file's speaker and session labels (a diagnostic): `build` refuses a corpus without them.
    needs_labels: bool = False

    def default_config(self) -> dict:
        """The `config.ssps` keys it reads beyond the shared ones, with their defaults (sslsv's names)."""
        return {}

    def validate(self, config: ml_collections.ConfigDict, method: Method, fail: Fail) -> None:
        """Checks its keys when `config.ssps.sampling` selects it (SSPS enabled), and what `method` cannot do
        with it."""
        del config, method, fail

    def validate_unselected(self, config: ml_collections.ConfigDict, fail: Fail) -> None:
        """Checks that a config selecting another sampler does not set what only this one reads."""
        del config, fail

    @abc.abstractmethod
    def sample(
        self,
        state: SSPSState,
        anchors_local: jax.Array,
        y_ref_local: jax.Array,
        key: jax.Array,
        cfg: SamplingConfig,
        axis: str,
    ) -> Sample:
        """Pseudo-positives of this device's anchors (dataset indices (n,), their y^ (n, D)), from the queues."""


# -- pieces the samplers share ------------------------------------------------------------------------------


def rank_logits(size: int, exponential: bool, lam: float) -> jnp.ndarray:
    """Log-weights over ranks 0..size-1: uniform, or lambda exp(-lambda rank) (normalised by sampling)."""
    ranks = jnp.arange(size, dtype=jnp.float32)
    return -lam * ranks if exponential else jnp.zeros_like(ranks)


def anchor_keys(key: jax.Array, count: int, offset=0) -> jax.Array:
    """The key of each anchor: fold_in(step key, its position in the global batch)."""
    return jax.vmap(lambda b: jax.random.fold_in(key, b))(offset + jnp.arange(count))


def fetch(pos_emb: jax.Array, pos_index: jax.Array, entry: jax.Array, mine: jax.Array, axis: str):
    """Embeddings and dataset indices of local rows `entry` (G,) where `mine`, sent to each anchor's device.

    Rows are read view by view, as (block, row) of the queue's own (V, blocks, rows, D) layout, in slices of at
    most 32 768 lanes: one gather of (V, D) slices from the flattened queue made XLA:TPU lay the whole queue out
    again every step (3.3 GB a device for DINO's 65 536-wide rows; docs/performance.md).
    """
    block, row = entry // pos_emb.shape[2], entry % pos_emb.shape[2]
    d, chunk = pos_emb.shape[-1], 32768
    rows = jnp.stack(
        [
            jnp.concatenate([pos_emb[v, block, row, c : c + chunk] for c in range(0, d, chunk)], axis=-1)
            for v in range(pos_emb.shape[0])
        ]
    )  # (V, G, D)
    emb = jnp.where(mine[None, :, None], rows, 0).astype(jnp.float32)
    emb = lax.psum_scatter(emb, axis, scatter_dimension=1, tiled=True)
    index = jnp.where(mine, pos_index[block, row] + 1, 0)
    return emb, lax.psum_scatter(index, axis, scatter_dimension=0, tiled=True) - 1


def local_slice(x: jax.Array, axis: str, n: int) -> jax.Array:
    """This device's n rows of a global-batch array."""
    return lax.dynamic_slice_in_dim(x, lax.axis_index(axis) * n, n)
