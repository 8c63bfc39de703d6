"""`ssps-jax bench-prepare`: files/s of `prepare` on a generated corpus, extrapolated to VoxCeleb2.

A corpus of `files` short utterances (m4a/AAC like VoxCeleb2 dev, or WAV),
`seconds` long on average (uniform between half and 1.5 times that), is
written once under `OUT/corpus` (reused by later runs with the same
settings). For each number of worker processes the dataset is prepared from
scratch into `OUT/tfds-<workers>` and timed: stage 1 (decode, check, stage
chunks: the part that runs in parallel) and the whole preparation (stage 2,
TFDS writing the records, runs in one process).

VoxCeleb2 dev is 1,092,009 files, 7.8 s on average (VoxCeleb2's 2,442 h over
its 1,128,246 utterances, dev and test together). Extrapolating from short
files gives two bounds: by file count (as if VoxCeleb2's files cost what
these do: too low, decoding grows with duration) and by audio duration (as if
all the cost grew with duration: too high, part of it is per file). The true
time lies between them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np

VOXCELEB2_DEV_FILES = 1_092_009
VOXCELEB2_MEAN_SECONDS = 2442 * 3600 / 1_128_246


def _voice(rng: np.random.Generator, seconds: float, rate: int) -> np.ndarray:
    """A harmonic tone with a little noise: a cheap stand-in for speech that every codec handles."""
    t = np.arange(int(seconds * rate)) / rate
    pitch = rng.uniform(90, 250)
    wave = sum(np.sin(2 * np.pi * pitch * h * t) / h for h in range(1, 5))
    return (0.1 * wave + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def _write_part(args: tuple[str, list[tuple[str, float]], str, int]) -> None:
    base, files, fmt, seed = args
    from data_pipelines import audio_io

    rng = np.random.default_rng(seed)
    for rel, seconds in files:
        path = Path(base) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        x = _voice(rng, seconds, audio_io.SAMPLE_RATE)
        if fmt == "m4a":
            audio_io.write_m4a(path, x)
        else:
            audio_io.write_wav(path, x)


def write_corpus(out: Path, files: int, seconds: float, fmt: str, workers: int) -> Path:
    """Writes (once) `files` utterances and their CSV under out/corpus; returns the CSV."""
    import concurrent.futures

    corpus = out / "corpus"
    csv_path = corpus / "train.csv"
    spec = f"{files} {seconds} {fmt}"
    if (corpus / "SPEC").is_file() and (corpus / "SPEC").read_text() == spec:
        return csv_path
    shutil.rmtree(corpus, ignore_errors=True)
    rng = np.random.default_rng(0)
    rows = [
        (f"id{i // 200:05d}/s{i // 20 % 10:02d}/{i:06d}.{fmt}", float(rng.uniform(0.5, 1.5) * seconds))
        for i in range(files)
    ]
    parts = [(str(corpus), rows[i : i + 500], fmt, i) for i in range(0, files, 500)]
    started = time.perf_counter()
    if workers <= 1:
        for part in parts:
            _write_part(part)
    else:
        context = multiprocessing.get_context("spawn")  # not fork: the caller may run threads (JAX)
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            list(pool.map(_write_part, parts))
    corpus.mkdir(parents=True, exist_ok=True)
    csv_path.write_text("File,Speaker\n" + "".join(f"{rel},{rel.split('/')[0]}\n" for rel, _ in rows))
    (corpus / "SPEC").write_text(spec)
    print(f"wrote {files} {fmt} files in {time.perf_counter() - started:.0f} s to {corpus}", flush=True)
    return csv_path


def measure(csv_path: Path, data_dir: Path, workers: int, storage: str) -> dict:
    """Prepares from scratch with `workers` processes; times stage 1 and the whole."""
    from data_pipelines import speaker_corpus

    shutil.rmtree(data_dir, ignore_errors=True)
    marks = {}

    def say(message: str) -> None:
        if message.startswith("writing "):
            marks["stage1"] = time.perf_counter()
        print(f"  {message}", flush=True)

    started = time.perf_counter()
    builder = speaker_corpus.prepare(csv_path, csv_path.parent, data_dir, workers=workers, storage=storage, say=say)
    total = time.perf_counter() - started
    return {
        "workers": workers,
        "files": builder.info.splits["train"].num_examples,
        "stage1_s": marks["stage1"] - started,
        "total_s": total,
        "record_bytes": sum(f.stat().st_size for f in data_dir.rglob("*.array_record*")),
    }


def run(out: Path, files: int, seconds: float, fmt: str, workers: list[int], storage: str) -> dict:
    from data_pipelines import staging
    from data_pipelines.manifests import read_utterances

    csv_path = write_corpus(out, files, seconds, fmt, max(workers))
    audio_seconds = staging.estimate_seconds(read_utterances(csv_path), csv_path.parent, sample=files)
    rows = [measure(csv_path, out / f"tfds-{w}", w, storage) for w in workers]
    return {
        "cpus": os.cpu_count(),
        "load": os.getloadavg(),
        "files": files,
        "format": fmt,
        "storage": storage,
        "audio_seconds": audio_seconds,
        "rows": rows,
    }


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def table(result: dict) -> str:
    mean = result["audio_seconds"] / result["files"]
    vox_seconds = VOXCELEB2_DEV_FILES * VOXCELEB2_MEAN_SECONDS
    lines = [
        f"prepare: {result['files']} {result['format']} files, mean {mean:.2f} s ({_hours(result['audio_seconds'])}), "
        f"storage {result['storage']}, {result['cpus']} CPUs, load {result['load'][0]:.2f}",
        "",
        "| workers | stage 1 (decode) files/s | whole files/s | audio s per s | VoxCeleb2 dev by files | by duration |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        whole = r["files"] / r["total_s"]
        audio_rate = result["audio_seconds"] / r["total_s"]
        lines.append(
            f"| {r['workers']} | {r['files'] / r['stage1_s']:.1f} | {whole:.1f} | {audio_rate:.0f} | "
            f"{_hours(VOXCELEB2_DEV_FILES / whole)} | {_hours(vox_seconds / audio_rate)} |"
        )
    return "\n".join(lines)


def main(out: str, files: int, seconds: float, fmt: str, workers: list[int], storage: str, json_path: str | None):
    """`ssps-jax bench-prepare`: runs, prints the table, writes the JSON."""
    result = run(Path(out).resolve(), files, seconds, fmt, workers, storage)
    print(table(result), flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written to {json_path}")
    return result
