"""Stage 1 of corpus preparation: decode and check every file, in parallel, resumably.

A corpus of a million files (VoxCeleb2) takes hours to decode, so this stage
is built to be spread over processes and to survive being killed:

- The CSV is cut into chunks of `chunk_size` consecutive rows. A worker
  process decodes one chunk (audio_io.read_audio: checks, conversions) and
  writes it as one `.npz` under the staging folder: the stored bytes of every
  good file (int16 PCM, or a FLAC file) end to end, their offsets, and one
  JSON row per CSV row (status, reason, silent). The file is written under a
  temporary name and renamed when complete, so a chunk file that exists is a
  whole chunk: a rerun after a kill decodes only the chunks that are missing.
- Workers are started with "spawn", not "fork": the caller may already run
  JAX's threads (`train` prepares on first use), which fork does not copy.
  With one worker the chunks are decoded in this process.
- The staging folder holds a KEY (hash of the CSV's bytes and of every
  setting that changes a chunk's content). Staging left by another CSV or
  other settings is refused, never mixed in.
- The staging folder is always on a local disk (`prepare` of a gs:// data
  dir stages and writes the records locally, then copies them there); the
  corpus it decodes (the base folder) may be remote.
- Progress is printed as plain lines (files/s, elapsed, ETA), like training's
  progress line, at most every `PROGRESS_SECONDS` (ssps_jax/observe.py's
  helpers are not reused: that module imports JAX, which data needs not).

Stage 2 (speaker_corpus) streams the chunks in CSV order into TFDS records.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from etils import epath

from data_pipelines import audio_io
from data_pipelines.errors import InputError
from data_pipelines.manifests import Utterance

STORAGES = ("int16", "flac")
PROGRESS_SECONDS = 10.0
HEADER_SAMPLE = 2000  # files whose header is read to estimate the corpus duration
# Disk written per byte of stored audio: staging chunks, TFDS's temporary copy
# (its writer spills what it buffers to disk beyond 1 GB) and the records.
DISK_COPIES = 3


@dataclasses.dataclass(frozen=True)
class Task:
    """One chunk to decode: everything a worker process needs, picklable."""

    index: int
    path: str  # the chunk's .npz
    base_dir: str
    files: tuple[tuple[int, str], ...]  # (CSV line, file relative to base_dir)
    min_seconds: float
    storage: str


def chunk_path(staging_dir: Path | str, index: int) -> Path:
    return Path(staging_dir) / f"chunk-{index:06d}.npz"


def _encode(samples: np.ndarray, storage: str) -> bytes:
    return audio_io.encode_flac(samples) if storage == "flac" else samples.tobytes()


def decode_chunk(task: Task) -> tuple[int, int, float]:
    """Decodes one chunk and writes it atomically; returns (chunk index, files, seconds of audio kept)."""
    rows, payloads, seconds = [], [], 0.0
    for line, file in task.files:
        row = {"line": line, "file": file, "status": "ok", "reason": "", "silent": False}
        try:
            audio = audio_io.read_audio(epath.Path(task.base_dir) / file, task.min_seconds)
        except audio_io.AudioFileError as e:
            row.update(status="skipped", reason=e.reason)
        else:
            row.update(reason="; ".join(audio.notes), silent=audio_io.is_silent(audio.samples))
            payloads.append(_encode(audio.samples, task.storage))
            seconds += len(audio.samples) / audio_io.SAMPLE_RATE
        rows.append(row)
    offsets = np.cumsum([0] + [len(p) for p in payloads], dtype=np.int64)
    tmp = Path(f"{task.path}.tmp")
    with tmp.open("wb") as f:
        np.savez(f, payload=np.frombuffer(b"".join(payloads), np.uint8), offsets=offsets, rows=json.dumps(rows))
        f.flush()
        os.fsync(f.fileno())  # on disk before it is named: complete even after a crash of the machine
    os.replace(tmp, task.path)  # atomic: a chunk file that exists is complete
    return task.index, len(rows), seconds


def read_rows(path: Path | str) -> list[dict]:
    """The per-file results of a staged chunk (no audio read)."""
    with np.load(path) as chunk:
        return json.loads(str(chunk["rows"]))


def read_payloads(path: Path | str) -> Iterator[tuple[dict, bytes]]:
    """(row, stored bytes) of every good file of a staged chunk, in CSV order."""
    with np.load(path) as chunk:
        rows, payload, offsets = json.loads(str(chunk["rows"])), chunk["payload"], chunk["offsets"]
    good = (r for r in rows if r["status"] == "ok")
    for row, start, end in zip(good, offsets[:-1], offsets[1:]):
        yield row, payload[start:end].tobytes()


def make_tasks(
    utterances: list[Utterance], base_dir: epath.PathLike, staging_dir: Path | str, *, chunk_size, min_seconds, storage
) -> list[Task]:
    return [
        Task(
            index=i,
            path=str(chunk_path(staging_dir, i)),
            base_dir=str(base_dir),
            files=tuple((u.line, u.file) for u in utterances[start : start + chunk_size]),
            min_seconds=min_seconds,
            storage=storage,
        )
        for i, start in enumerate(range(0, len(utterances), chunk_size))
    ]


def open_staging(staging_dir: Path | str, key: str) -> Path:
    """Creates the staging folder for `key`, or reuses one left by the same preparation."""
    staging_dir = Path(staging_dir)
    key_file = staging_dir / "KEY"
    if staging_dir.is_dir():
        found = key_file.read_text().strip() if key_file.is_file() else "(none)"
        if found != key:
            raise InputError(
                f"{staging_dir} holds a preparation of another CSV or other settings (key {found[:12]}, "
                f"this one {key[:12]}): delete that folder to start over"
            )
        return staging_dir
    staging_dir.mkdir(parents=True)
    key_file.write_text(key + "\n")
    return staging_dir


def remove_staging(staging_dir: Path | str) -> None:
    shutil.rmtree(staging_dir, ignore_errors=True)


def duration(seconds: float) -> str:
    """`1h05m` or `4m07s`: the ETA format of every progress line."""
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Plain progress lines: files done, files/s and ETA over this run's decoding."""

    def __init__(self, total: int, done: int, say: Callable[[str], None], every: float = PROGRESS_SECONDS):
        self.total, self.done, self.say, self.every = total, done, say, every
        self._start_done = done
        self._start = self._last = time.perf_counter()

    def update(self, files: int, final: bool = False) -> None:
        self.done += files
        now = time.perf_counter()
        if not final and now - self._last < self.every:
            return
        self._last = now
        elapsed = now - self._start
        rate = (self.done - self._start_done) / max(elapsed, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        self.say(
            f"decoded {self.done}/{self.total} files ({self.done / max(self.total, 1):.0%})  {rate:.1f} files/s  "
            f"elapsed {duration(elapsed)}  ETA {duration(eta) if eta != float('inf') else '?'}"
        )


def run(tasks: list[Task], total_files: int, workers: int, say: Callable[[str], None] = print) -> None:
    """Decodes every task whose chunk file is missing, with `workers` processes."""
    todo = [t for t in tasks if not Path(t.path).is_file()]
    done_files = sum(len(t.files) for t in tasks if Path(t.path).is_file())
    if len(todo) < len(tasks):
        say(f"resuming: {len(tasks) - len(todo)} of {len(tasks)} chunks ({done_files} files) already decoded")
    progress = Progress(total_files, done_files, say)
    if not todo:
        return
    workers = min(workers, len(todo))
    if workers <= 1:  # no process to start (each would import the decoders again)
        for task in todo:
            progress.update(decode_chunk(task)[1])
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            for future in concurrent.futures.as_completed([pool.submit(decode_chunk, t) for t in todo]):
                progress.update(future.result()[1])
    progress.update(0, final=True)


def estimate_seconds(utterances: list[Utterance], base_dir: epath.PathLike, sample: int = HEADER_SAMPLE) -> float:
    """Total audio duration from the headers of `sample` files evenly spread over the CSV, scaled to all."""
    if not utterances:
        return 0.0
    picked = utterances[:: max(1, len(utterances) // sample)][:sample]
    seconds = [audio_io.duration_seconds(epath.Path(base_dir) / u.file) for u in picked]
    return float(np.mean(seconds)) * len(utterances)


def disk_needed(seconds: float) -> int:
    """Bytes the preparation writes for `seconds` of audio, int16 or FLAC (FLAC is at most about PCM's size)."""
    return int(DISK_COPIES * seconds * audio_io.SAMPLE_RATE * 2)


def free_bytes(folder: Path | str) -> int:
    """Free space on the file system that holds `folder` (or would: its nearest existing parent)."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def size_text(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def folder_bytes(folder: Path | str) -> int:
    folder = Path(folder)
    return sum(f.stat().st_size for f in folder.glob("*")) if folder.is_dir() else 0
