"""Embedding whole utterances of any length with a bounded number of compilations, streaming their audio.

Utterances are sorted by length and padded up to the next *bucket* length
(a geometric grid, `ratio` apart), so a test set compiles once per bucket
rather than once per distinct length. The model masks the padding (see
ssps_jax/ops.py), so every embedding equals that of the utterance alone.
Batches have a fixed size (a multiple of the device count) and are split
over the mesh like training batches; short last batches are filled with
copies of their first utterance and the copies dropped.

Streaming: the batches are planned from the utterances' lengths alone
(`plan`), and `embed` reads each batch's audio through a callback, in a thread
pool, one batch ahead of the devices, and drops it once embedded. Host memory
is the (N, D) embeddings plus two batches of audio, whatever N. A length given
to `plan` is an upper bound: a shorter utterance is padded further (and
masked), a longer one is an error naming it.
"""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from data_pipelines.audio_io import AudioFileError
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

    def plan(self, lengths: Sequence[int]) -> list[tuple[int, np.ndarray]]:
        """The batches: (padded length, indices into `lengths`, at most batch_size), shortest bucket first."""
        lengths = np.asarray(lengths)
        buckets = np.array(bucket_lengths(int(lengths.max()), self.min_bucket, self.bucket_ratio))
        which = np.searchsorted(buckets, lengths)
        order = np.lexsort((lengths, which))
        batches = []
        for b in np.unique(which):
            members = order[which[order] == b]
            batches += [
                (int(buckets[b]), members[s : s + self.batch_size]) for s in range(0, len(members), self.batch_size)
            ]
        return batches

    def embed(
        self,
        variables,
        lengths: Sequence[int],
        read: Callable[[int], np.ndarray],
        threads: int = 8,
        names: Callable[[int], str] = str,
    ) -> np.ndarray:
        """(N, D) float32 embeddings of utterances 0..N-1, in order; `read(i)` gives utterance i's 1-D audio.

        `lengths[i]` bounds utterance i's length (samples); `names(i)` names it in errors.
        """
        per_process = self.batch_size // jax.process_count()
        mine = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
        out = None
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:

            def start_reading(batch):  # this process's rows only: the padded ones repeat the first
                length, chunk = batch
                rows = np.concatenate([chunk, np.full(self.batch_size - len(chunk), chunk[0])])[mine]
                return length, chunk, rows, {int(i): pool.submit(read, int(i)) for i in np.unique(rows)}

            batches = self.plan(lengths)
            pending = start_reading(batches[0]) if batches else None
            in_flight = None  # (chunk, device result) of the previous batch: fetched after the next is dispatched
            for n in range(len(batches)):
                length, chunk, rows, reads = pending
                pending = start_reading(batches[n + 1]) if n + 1 < len(batches) else None
                wave = np.zeros((len(rows), length), np.float32)
                row_lengths = np.empty(len(rows), np.int32)
                for row, i in enumerate(rows):
                    audio = reads[int(i)].result()
                    if len(audio) > lengths[i]:
                        raise AudioFileError(
                            names(int(i)), f"{len(audio)} samples, more than its header's {lengths[i]}"
                        )
                    wave[row, : len(audio)] = _as_float(audio)
                    row_lengths[row] = len(audio)
                del reads
                batch = sharding.global_batch({"wave": wave, "lengths": row_lengths}, self.mesh)
                result = self.program(variables, batch["wave"], batch["lengths"])
                if in_flight is not None:
                    out = _store(out, *in_flight, len(lengths))
                in_flight = (chunk, result)
            if in_flight is not None:
                out = _store(out, *in_flight, len(lengths))
        return out

    def __call__(self, variables, waves: list[np.ndarray]) -> np.ndarray:
        """(N, D) float32 embeddings of `waves` (1-D int16 or float arrays) held in memory, in input order."""
        return self.embed(variables, [len(w) for w in waves], waves.__getitem__, threads=1)


def _store(out: np.ndarray | None, chunk: np.ndarray, result, n: int) -> np.ndarray:
    emb = np.asarray(result)
    if out is None:
        out = np.zeros((n, emb.shape[1]), np.float32)
    out[chunk] = emb[: len(chunk)]
    return out


def _as_float(wave: np.ndarray) -> np.ndarray:
    return wave.astype(np.float32) / 32768.0 if wave.dtype == np.int16 else wave.astype(np.float32)


def l2_normalise(x: jnp.ndarray | np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
