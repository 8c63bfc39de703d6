"""Embedding whole utterances of any length with a bounded number of compilations.

Utterances are sorted by length and padded up to the next *bucket* length
(a geometric grid, `ratio` apart), so a test set compiles once per bucket
rather than once per distinct length. The model masks the padding (see
ssps_jax/ops.py), so every embedding equals that of the utterance alone.
Batches have a fixed size (a multiple of the device count) and are split
over the mesh like training batches; short last batches are filled with
copies of their first utterance and the copies dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ssps_jax import sharding


def bucket_lengths(longest: int, shortest: int, ratio: float, multiple: int = 160) -> list[int]:
    """Increasing padded lengths (multiples of `multiple`) from `shortest` until >= `longest`."""
    buckets = []
    length = float(max(shortest, multiple))
    while True:
        b = math.ceil(length / multiple) * multiple
        if not buckets or b > buckets[-1]:
            buckets.append(b)
        if b >= longest:
            return buckets
        length *= ratio


class Embedder:
    """Calls `embed_fn(variables, wave, lengths) -> (B, D)` over padded buckets on `mesh`."""

    def __init__(
        self,
        embed_fn: Callable,
        mesh: Mesh,
        batch_size: int,
        bucket_ratio: float = 1.25,
        min_bucket: int = 32000,
    ):
        devices = mesh.devices.size
        self.batch_size = math.ceil(batch_size / devices) * devices
        self.mesh = mesh
        self.bucket_ratio = bucket_ratio
        self.min_bucket = min_bucket
        # (variables, wave (B, L) split over `data`, lengths (B,)) -> (B, D) replicated; compiled once per bucket.
        self.program = jax.jit(embed_fn, out_shardings=sharding.replicated(mesh))

    def __call__(self, variables, waves: list[np.ndarray]) -> np.ndarray:
        """(N, D) float32 embeddings of `waves` (1-D int16 or float arrays), in input order."""
        lengths = np.array([len(w) for w in waves])
        buckets = np.array(bucket_lengths(int(lengths.max()), self.min_bucket, self.bucket_ratio))
        which = np.searchsorted(buckets, lengths)
        order = np.lexsort((lengths, which))
        out = None
        per_process = self.batch_size // jax.process_count()
        mine = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
        for b in np.unique(which):
            members = order[which[order] == b]
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                padded = np.concatenate([chunk, np.full(self.batch_size - len(chunk), chunk[0])])
                wave = np.zeros((self.batch_size, buckets[b]), np.float32)
                for row, i in enumerate(padded):
                    wave[row, : lengths[i]] = _as_float(waves[i])
                batch = sharding.global_batch({"wave": wave[mine], "lengths": lengths[padded][mine]}, self.mesh)
                emb = np.asarray(self.program(variables, batch["wave"], batch["lengths"]))
                if out is None:
                    out = np.zeros((len(waves), emb.shape[1]), np.float32)
                out[chunk] = emb[: len(chunk)]
        return out


def _as_float(wave: np.ndarray) -> np.ndarray:
    return wave.astype(np.float32) / 32768.0 if wave.dtype == np.int16 else wave.astype(np.float32)


def l2_normalise(x: jnp.ndarray | np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
