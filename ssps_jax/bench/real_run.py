"""`ssps-jax bench-run`: a real `ssps-jax train` run, end to end, on a VoxCeleb-shaped synthetic corpus.

What `ssps-jax bench` (the step alone, on synthetic batches) cannot say: the
samples/s of a training run with its input pipeline, its epochs' k-means,
checkpoints and evaluation. Everything goes under OUT:

  corpus/   written once (reused while its spec is the same): VoxCeleb's layout,
            <speaker>/<video>/<nnnnn>.wav (`id0....` train and `id1....` test
            speakers, 11-character video ids), 16 kHz PCM-16, durations 4 s plus
            an exponential, mean VoxCeleb2 dev's 7.8 s, cut at 20 s (VoxCeleb's
            segments are >= 4 s); each speaker's audio is cut from a voice
            synthesised once for the speaker (the demo corpus's voices,
            data_pipelines/demo_corpus) and passed through a channel per video.
            Plus train.csv, trials.txt (VoxCeleb format, test speakers,
            cross-video targets) and MUSAN-layout noises and simulated RIRs.
  tfds/     the prepared train split (`ssps-jax prepare`, every core).
  <on>/     one workdir per augmentation path (`data.augment.on`), trained from
            scratch.

Each path trains the config (default configs/simclr_ssps_ecapa.py: the paper's
SimCLR-SSPS, ECAPA-TDNN C=1024; bf16 by default) for `epochs` epochs: plain
epochs, the queue-fill epoch and one SSPS epoch with its k-means (ssps.start_epoch
= epochs - 1), a checkpoint at each epoch end and an evaluation at the end. The
SSPS sizes are scaled to the corpus: K = N / 44 (the paper's 1 092 009 / 25 000),
Q' = min(25 000, N). Then, per path, from the run's metrics.jsonl:

  e2e samples/s     median over the logging windows after the first (which holds
                    start-up and the first compile) of the run's samples/s; the
                    few windows with a checkpoint, the k-means or the SSPS
                    step's compile do not move a median
  device samples/s  global batch / median devices' step time (ssps_jax/input_wait.py)
  bench samples/s   `--against`: the SSPS step's samples/s in a `ssps-jax bench` JSON
  input wait        median share of a window spent blocked on the input
  k-means, evaluation, checkpoint seconds, and the path's whole wall time.

docs/benchmarks.md ("A real run") has the one-call command for the lent GPU
machine, where what the machine lacks travels as wheels (`make gpu-wheels`).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import multiprocessing
import os
import shutil
import statistics
import time
from pathlib import Path

import ml_collections
import numpy as np

from ssps_jax.bench.prepare import VOXCELEB2_MEAN_SECONDS

MIN_SECONDS, MAX_SECONDS = 4.0, 20.0
PAPER_N_PER_K = 1_092_009 / 25_000  # utterances per k-means cluster in the paper
PAPER_QUEUE = 25_000
_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    speakers: int = 320
    videos: int = 4  # per speaker
    utterances: int = 8  # per video
    test_speakers: int = 40
    trials: int = 6000  # at most; half targets
    voice_seconds: float = 30.0  # synthesised per speaker, utterances are cut from it
    noise_files: int = 6  # per MUSAN category
    noise_seconds: float = 8.0  # as sslsv splits MUSAN
    rirs: int = 4  # per room type
    seed: int = 0

    @property
    def train_utterances(self) -> int:
        return self.speakers * self.videos * self.utterances


def _duration(rng: np.random.Generator) -> float:
    """VoxCeleb-like: at least 4 s, mean ~7.8 s, long tail cut at 20 s."""
    return min(MIN_SECONDS + rng.exponential(VOXCELEB2_MEAN_SECONDS - MIN_SECONDS), MAX_SECONDS)


def _write_speaker(out: str, spec: CorpusSpec, speaker: str, number: int) -> list[tuple[str, str, str]]:
    """One speaker's videos and utterances; returns their (file, speaker, video) rows."""
    from data_pipelines.audio_io import SAMPLE_RATE, write_wav
    from data_pipelines.demo_corpus import channel as channel_lib
    from data_pipelines.demo_corpus import voice as voice_lib

    rng = np.random.default_rng([spec.seed, number])
    voice = voice_lib.synthesize(voice_lib.sample_voice(rng), rng, spec.voice_seconds)
    rows = []
    for _ in range(spec.videos):
        video = "".join(_ID_CHARS[i] for i in rng.integers(0, len(_ID_CHARS), 11))
        channel = channel_lib.sample_channel(rng)
        for u in range(spec.utterances):
            n = round(_duration(rng) * SAMPLE_RATE)
            piece = np.take(voice, np.arange(n) + rng.integers(len(voice)), mode="wrap")
            rel = f"{speaker}/{video}/{u + 1:05d}.wav"
            write_wav(Path(out) / rel, channel_lib.apply_channel(piece, channel, rng))
            rows.append((rel, speaker, video))
    return rows


def _write_noise(out: str, spec: CorpusSpec, category: str, k: int) -> None:
    """One MUSAN-layout noise file (the demo corpus's generators; babble is the slow one)."""
    from data_pipelines.audio_io import write_wav
    from data_pipelines.demo_corpus import backgrounds

    c = list(backgrounds.MUSAN_CATEGORIES).index(category)
    audio = backgrounds.MUSAN_CATEGORIES[category](np.random.default_rng([spec.seed, 1, c, k]), spec.noise_seconds)
    write_wav(Path(out) / f"musan_split/{category}/synthetic/{category}-{k:04d}.wav", 0.5 * audio)


def _write_rir(out: str, spec: CorpusSpec, room: str, k: int) -> None:
    """One simulated RIR, <room type>/<room>/*.wav."""
    from data_pipelines.audio_io import write_wav
    from data_pipelines.demo_corpus import backgrounds

    r = backgrounds.ROOMS.index(room)
    rir = backgrounds.room_impulse_response(np.random.default_rng([spec.seed, 2, r, k]), room)
    write_wav(Path(out) / f"simulated_rirs/{room}/Room001/Room001-{k + 1:05d}.wav", rir / np.abs(rir).max())


def _call(job):
    fn, *args = job
    return fn(*args)


def _trials(spec: CorpusSpec, rows: list[tuple[str, str, str]]) -> list[tuple[int, str, str]]:
    """Cross-video target pairs and as many different-speaker pairs (at most spec.trials in all), shuffled."""
    rng = np.random.default_rng([spec.seed, 3])
    targets = [(1, a[0], b[0]) for i, a in enumerate(rows) for b in rows[i + 1 :] if a[1] == b[1] and a[2] != b[2]]
    targets = [targets[i] for i in rng.permutation(len(targets))[: spec.trials // 2]]
    others = set()
    while len(others) < len(targets):
        i, j = (int(x) for x in rng.integers(0, len(rows), 2))
        if rows[i][1] != rows[j][1]:
            others.add((0, rows[i][0], rows[j][0]))
    trials = targets + sorted(others)
    return [trials[i] for i in rng.permutation(len(trials))]


def write_corpus(out: Path, spec: CorpusSpec, workers: int) -> Path:
    """Writes (once) the corpus of `spec` under `out` (module docstring); returns `out`."""
    stamp = out / "corpus.json"
    text = json.dumps(dataclasses.asdict(spec), sort_keys=True)
    if stamp.is_file() and stamp.read_text() == text:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    speakers = [(f"id{i:05d}", i) for i in range(spec.speakers)]
    speakers += [(f"id1{i:04d}", 100_000 + i) for i in range(spec.test_speakers)]
    from data_pipelines.demo_corpus import backgrounds

    # The slowest jobs first (babble: several voices), so that the pool ends together.
    jobs = [(_write_noise, str(out), spec, c, k) for c in backgrounds.MUSAN_CATEGORIES for k in range(spec.noise_files)]
    jobs += [(_write_rir, str(out), spec, room, k) for room in backgrounds.ROOMS for k in range(spec.rirs)]
    banks = len(jobs)
    jobs += [(_write_speaker, str(out), spec, name, number) for name, number in speakers]
    if workers > 1:
        context = multiprocessing.get_context("spawn")  # not fork: the caller may run threads (JAX)
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            results = list(pool.map(_call, jobs, chunksize=1))
    else:
        results = [_call(job) for job in jobs]
    per_speaker = results[banks:]
    train = [row for rows in per_speaker[: spec.speakers] for row in rows]
    test = [row for rows in per_speaker[spec.speakers :] for row in rows]
    with (out / "train.csv").open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["File", "Speaker", "Session"])
        writer.writerows(train)
    (out / "trials.txt").write_text("".join(f"{label} {a} {b}\n" for label, a, b in _trials(spec, test)))
    stamp.write_text(text)
    print(f"wrote {len(train)} + {len(test)} test utterances in {time.perf_counter() - started:.0f} s to {out}")
    return out


@dataclasses.dataclass(frozen=True)
class RunSettings:
    epochs: int = 10
    batch: int | None = None  # the config's
    dtype: str | None = "bfloat16"
    workers: int = 8
    log_every: int = 10


def run_config(
    config: ml_collections.ConfigDict, corpus: Path, data_dir: Path, size: int, on: str, settings: RunSettings
) -> ml_collections.ConfigDict:
    """`config` set up for one path of the real run (module docstring)."""
    c = config.copy_and_resolve_references()
    c.data.train_csv = str(corpus / "train.csv")
    c.data.base_dir = str(corpus)
    c.data.tfds_dir = str(data_dir)
    c.data.train_size = 0
    c.data.augment.enabled = True
    c.data.augment.on = on
    c.data.workers = settings.workers
    if settings.dtype:
        c.model.dtype = settings.dtype
    if settings.batch:
        c.train.global_batch_size = settings.batch
    batch = c.train.global_batch_size
    c.train.epochs = settings.epochs
    c.train.stop_at_epoch = 0
    c.train.log_every_steps = settings.log_every
    c.train.checkpoint_every_steps = 1 << 30  # at epoch ends only
    c.train.keep_checkpoints = 2
    c.ssps.enabled = True
    c.ssps.start_epoch = settings.epochs - 1
    c.ssps.kmeans_clusters = max(2, round(size / PAPER_N_PER_K))
    c.ssps.inter_sampling_size = min(c.ssps.inter_sampling_size, c.ssps.kmeans_clusters - 1)
    c.ssps.pos_queue_size = max(batch, min(PAPER_QUEUE, size // batch * batch))
    c.eval.trials = (str(corpus / "trials.txt"),)
    c.eval.base_dir = str(corpus)
    c.eval.every_epochs = settings.epochs
    c.eval.score_norm = ""
    return c


def summarize(workdir: Path, batch: int, wall_s: float) -> dict:
    """The path's figures (module docstring) from its metrics.jsonl."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train" and "samples_per_s" in r]
    windows = train[1:] or train
    steps = [r["device_step_s"] for r in windows if "device_step_s" in r]
    seconds = {kind: [r["seconds"] for r in records if r["kind"] == kind] for kind in ("eval", "checkpoint")}
    kmeans = [r["kmeans_seconds"] for r in records if r["kind"] == "ssps" and "kmeans_seconds" in r]
    evals = [r for r in records if r["kind"] == "eval"]
    return {
        "steps": train[-1]["step"] if train else 0,
        "windows": len(windows),
        "e2e_samples_per_s": statistics.median(r["samples_per_s"] for r in windows) if windows else None,
        "device_step_s": statistics.median(steps) if steps else None,
        "device_samples_per_s": batch / statistics.median(steps) if steps else None,
        "input_wait_share": statistics.median(r["input_wait_share"] for r in windows) if windows else None,
        "input_wait_share_max": max((r["input_wait_share"] for r in windows), default=None),
        "kmeans_s": kmeans,
        "eval_s": seconds["eval"],
        "checkpoint_s": seconds["checkpoint"],
        "eer": next((v for k, v in evals[-1].items() if k.endswith("cosine/eer")), None) if evals else None,
        "wall_s": wall_s,
    }


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _row(name: str, p: dict, bench: float | None) -> str:
    """One cell of the table: measure `name` of path `p`."""
    if name == "steps":
        return f"{p['steps']} ({p['windows']})"
    if name == "e2e":
        return f"**{_fmt(p['e2e_samples_per_s'])}**"
    if name == "device":
        step_ms = None if p["device_step_s"] is None else 1000 * p["device_step_s"]
        return f"{_fmt(p['device_samples_per_s'])} ({_fmt(step_ms, '.0f')} ms)"
    if name == "e2e/device":
        return _fmt(_ratio(p["e2e_samples_per_s"], p["device_samples_per_s"]), ".0%")
    if name == "e2e/bench":
        return _fmt(_ratio(p["e2e_samples_per_s"], bench), ".0%")
    if name == "wait":
        return f"{_fmt(p['input_wait_share'], '.0%')} ({_fmt(p['input_wait_share_max'], '.0%')})"
    if name == "kmeans":
        return ", ".join(f"{s:.2f}" for s in p["kmeans_s"]) or "-"
    if name == "eval":
        return ", ".join(f"{s:.1f}" for s in p["eval_s"]) or "-"
    if name == "checkpoint":
        median = statistics.median(p["checkpoint_s"]) if p["checkpoint_s"] else None
        return f"{len(p['checkpoint_s'])}, {_fmt(median, '.2f')}"
    if name == "eer":
        return _fmt(None if p["eer"] is None else 100 * p["eer"], ".2f")
    return f"{p['wall_s']:.0f}"


def table(result: dict) -> str:
    """Measures as rows, one column per augmentation path."""
    paths, bench = result["paths"], result.get("bench_samples_per_s")
    head = (
        f"real run: {result['devices']}; {result['model']}, global batch {result['batch']}; "
        f"{result['train_utterances']} train utterances ({result['train_hours']:.1f} h, prepared in "
        f"{result['prepare_s']:.0f} s), {result['epochs']} epochs (SSPS K {result['kmeans_clusters']}, "
        f"Q' {result['queue']}); {result['workers']} grain workers, {result['cpus']} CPUs"
    )
    names = [
        ("steps", "steps (logged windows after the first)"),
        ("e2e", "**e2e samples/s**, median window"),
        ("device", "devices' step: samples/s (median step)"),
        ("e2e/device", "e2e / devices' step"),
        *([("e2e/bench", f"e2e / bench's step ({bench:.0f} samples/s)")] if bench else []),
        ("wait", "input wait share, median (max) window"),
        ("kmeans", "k-means (s)"),
        ("eval", "evaluation (s)"),
        ("checkpoint", "checkpoints: count, median (s)"),
        ("eer", "EER (%), cosine"),
        ("wall", "wall, whole path (s)"),
    ]
    lines = [head, "", "| | " + " | ".join(f"augment on {on}" for on in paths) + " |"]
    lines.append("| --- |" + " --- |" * len(paths))
    lines += [
        f"| {label} | " + " | ".join(_row(name, p, bench) for p in paths.values()) + " |" for name, label in names
    ]
    return "\n".join(lines)


def main(
    config: ml_collections.ConfigDict,
    out: str,
    spec: CorpusSpec,
    settings: RunSettings,
    paths: list[str],
    against: str | None,
    json_path: str | None,
) -> dict:
    """`ssps-jax bench-run`: corpus, preparation, one training run per path, the table."""
    import jax

    from data_pipelines import speaker_corpus
    from ssps_jax import train as train_lib

    out = Path(out)
    cpus = os.cpu_count() or 1
    jax.config.update("jax_compilation_cache_dir", str(out / "xla_cache"))  # the paths share their eval programs
    corpus = write_corpus(out / "corpus", spec, cpus)
    started = time.perf_counter()
    builder = speaker_corpus.prepare(corpus / "train.csv", corpus, out / "tfds", workers=cpus)
    size = builder.info.splits["train"].num_examples
    prepare_s = time.perf_counter() - started
    result = {
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "cpus": cpus,
        "workers": settings.workers,
        "train_utterances": size,
        "train_hours": _hours(corpus / "train.csv"),
        "prepare_s": prepare_s,
        "epochs": settings.epochs,
        "bench_samples_per_s": json.loads(Path(against).read_text())["samples_per_s"] if against else None,
        "paths": {},
    }
    for on in paths:
        c = run_config(config, corpus, out / "tfds", size, on, settings)
        workdir = out / on
        shutil.rmtree(workdir, ignore_errors=True)  # from scratch: a benchmark, not a resume
        print(f"=== data.augment.on={on}: training {workdir}", flush=True)
        started = time.perf_counter()
        train_lib.train(c, workdir)
        result["paths"][on] = summarize(workdir, c.train.global_batch_size, time.perf_counter() - started)
        channels = list(c.model.ecapa_tdnn.channels) if c.model.encoder == "ecapa_tdnn" else c.model.encoder
        result.update(
            model=f"{c.method}-SSPS {c.model.encoder} {channels} {c.model.dtype}",
            batch=c.train.global_batch_size,
            kmeans_clusters=c.ssps.kmeans_clusters,
            queue=c.ssps.pos_queue_size,
        )
        print(table(result), flush=True)  # after each path: a run cut short by a time limit still says something
        if json_path:
            Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
            print(f"written to {json_path}")
    return result


def _hours(csv_path: Path) -> float:
    """Hours of audio listed in a train CSV, from the files' headers."""
    from data_pipelines.audio_io import duration_seconds

    with csv_path.open() as f:
        return sum(duration_seconds(csv_path.parent / row["File"]) for row in csv.DictReader(f)) / 3600
