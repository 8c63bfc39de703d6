"""Writes the embedded demo corpus in sslsv layout, deterministically from a seed.

Layout under OUT (paths in the CSVs and the trial list are relative to OUT):

  demo/<speaker>/<session>/<utt>.wav     16 kHz mono PCM-16
  demo_train.csv                         File,Speaker,Session (train speakers)
  demo_test.csv                          File,Speaker,Session (test speakers)
  demo_trials.txt                        VoxCeleb format: "1|0 enrol test"
  musan_split/<speech|music|noise>/demo/*.wav
  simulated_rirs/<small|medium|large>room/Room001/*.wav
  demo_corpus.json                       the parameters it was made with

Every random draw comes from a generator keyed by (seed, what, which), so a
file's content depends only on the seed and its own identity: the corpus is
byte-identical across runs and across worker counts, and growing it with
`scale` keeps the existing test speakers' voices.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import itertools
import json
import multiprocessing
from pathlib import Path

import numpy as np

from data_pipelines.audio_io import write_wav
from data_pipelines.demo_corpus import backgrounds
from data_pipelines.demo_corpus import channel as channel_lib
from data_pipelines.demo_corpus import voice as voice_lib
from data_pipelines.errors import InputError

_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_TEST_SPEAKER_OFFSET = 100_000  # keeps test voices independent of the train size
TRAIN_CSV = "demo_train.csv"
TEST_CSV = "demo_test.csv"
TRIALS = "demo_trials.txt"
CHANNELS = ("default", "mild")


@dataclasses.dataclass(frozen=True)
class DemoCorpusSpec:
    seed: int = 0
    train_speakers: int = 60
    test_speakers: int = 20
    sessions: int = 3
    utterances: int = 6  # per session
    min_seconds: float = 3.0
    max_seconds: float = 8.0
    background_files: int = 6  # per MUSAN category
    background_seconds: float = 8.0  # sslsv splits MUSAN into 8 s files
    rirs_per_room: int = 4
    # Regime probes (docs/demo_findings.md): "mild" passes every session's channel through channel.milder;
    # session_drift scales how far a speaker's voice moves between sessions (Voice.with_state's spread).
    channels: str = "default"
    session_drift: float = 1.0

    def scaled(self, scale: float) -> DemoCorpusSpec:
        """The same corpus with `scale` times as many train and test speakers."""
        if scale <= 0:
            raise InputError(f"scale must be positive, got {scale}")
        return dataclasses.replace(
            self,
            train_speakers=max(1, round(self.train_speakers * scale)),
            test_speakers=max(2, round(self.test_speakers * scale)),
        )

    def validate(self) -> None:
        for name in ("train_speakers", "sessions", "utterances"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.test_speakers < 2:
            raise InputError(f"test_speakers must be >= 2 for non-target trials, got {self.test_speakers}")
        if self.sessions < 2:
            raise InputError(f"sessions must be >= 2 for cross-session trials, got {self.sessions}")
        if self.channels not in CHANNELS:
            raise InputError(f"channels must be one of {', '.join(CHANNELS)}, got {self.channels!r}")
        if not self.session_drift >= 0:  # also NaN
            raise InputError(f"session_drift must be >= 0, got {self.session_drift}")
        if not 0 < self.min_seconds <= self.max_seconds:
            raise InputError(f"need 0 < min_seconds <= max_seconds, got {self.min_seconds}, {self.max_seconds}")


def _rng(spec: DemoCorpusSpec, *key: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, *key])


def _session_id(rng: np.random.Generator) -> str:
    """An 11-character id, like a YouTube video id in VoxCeleb."""
    return "".join(_ID_CHARS[i] for i in rng.integers(0, len(_ID_CHARS), 11))


def _write_speaker(spec: DemoCorpusSpec, out: Path, speaker: str, number: int) -> list[tuple[str, str, str]]:
    """All sessions and utterances of one speaker; returns their CSV rows."""
    voice = voice_lib.sample_voice(_rng(spec, 0, number))
    rows = []
    for s in range(spec.sessions):
        session_rng = _rng(spec, 1, number, s)
        session = _session_id(session_rng)
        channel = channel_lib.sample_channel(session_rng)
        if spec.channels == "mild":
            channel = channel_lib.milder(channel)
        session_voice = voice.with_state(session_rng, spread=spec.session_drift)
        for u in range(spec.utterances):
            rng = _rng(spec, 2, number, s, u)
            seconds = rng.uniform(spec.min_seconds, spec.max_seconds)
            speech = voice_lib.synthesize(session_voice.with_state(rng, spread=0.3), rng, seconds)
            rel = f"demo/{speaker}/{session}/{u + 1:05d}.wav"
            write_wav(out / rel, channel_lib.apply_channel(speech, channel, rng))
            rows.append((rel, speaker, session))
    return rows


def _write_background(spec: DemoCorpusSpec, out: Path, kind: str, k: int) -> None:
    if kind in backgrounds.MUSAN_CATEGORIES:
        rng = _rng(spec, 3, list(backgrounds.MUSAN_CATEGORIES).index(kind), k)
        audio = backgrounds.MUSAN_CATEGORIES[kind](rng, spec.background_seconds)
        write_wav(out / f"musan_split/{kind}/demo/{kind}-demo-{k:04d}_00000.wav", 0.5 * audio)
    else:
        rng = _rng(spec, 4, backgrounds.ROOMS.index(kind), k)
        rir = backgrounds.room_impulse_response(rng, kind)
        write_wav(out / f"simulated_rirs/{kind}/Room001/Room001-{k + 1:05d}.wav", rir / np.abs(rir).max())


def _trials(spec: DemoCorpusSpec, rows: list[tuple[str, str, str]]) -> list[tuple[int, str, str]]:
    """Every cross-session target pair, and as many random non-target pairs."""
    targets = [(1, a[0], b[0]) for a, b in itertools.combinations(rows, 2) if a[1] == b[1] and a[2] != b[2]]
    rng = _rng(spec, 5)
    files = np.array([r[0] for r in rows])
    speakers = np.array([r[1] for r in rows])
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < len(targets):
        i, j = rng.integers(0, len(rows), 2)
        if speakers[i] != speakers[j] and (j, i) not in chosen:
            chosen.add((int(i), int(j)))
    trials = targets + [(0, files[i], files[j]) for i, j in sorted(chosen)]
    order = rng.permutation(len(trials))
    return [trials[i] for i in order]


def _write_csv(path: Path, rows: list[tuple[str, str, str]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["File", "Speaker", "Session"])
        writer.writerows(rows)


def write_demo_corpus(out: Path | str, spec: DemoCorpusSpec = DemoCorpusSpec(), workers: int = 1) -> Path:
    """Writes the corpus under `out` and returns `out`.

    `workers` > 1 synthesises in that many processes; the result is the same.
    """
    spec.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    speakers = [(f"id{i:05d}", i) for i in range(spec.train_speakers)]
    speakers += [(f"id{10000 + i:05d}", _TEST_SPEAKER_OFFSET + i) for i in range(spec.test_speakers)]
    jobs = [(_write_speaker, spec, out, name, number) for name, number in speakers]
    jobs += [
        (_write_background, spec, out, kind, k)
        for kind in backgrounds.MUSAN_CATEGORIES
        for k in range(spec.background_files)
    ]
    jobs += [(_write_background, spec, out, room, k) for room in backgrounds.ROOMS for k in range(spec.rirs_per_room)]

    if workers > 1:
        # spawn, not fork: the caller may have started threads (JAX, grain).
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            results = list(pool.map(_call, jobs, chunksize=1))
    else:
        results = [_call(job) for job in jobs]

    per_speaker = results[: len(speakers)]
    train_rows = [row for rows in per_speaker[: spec.train_speakers] for row in rows]
    test_rows = [row for rows in per_speaker[spec.train_speakers :] for row in rows]
    sessions = [r[2] for r in train_rows + test_rows]
    if len(set(sessions)) != len(sessions) // spec.utterances:
        raise RuntimeError("session id collision; choose another seed")  # ~1e-15 per pair

    _write_csv(out / TRAIN_CSV, train_rows)
    _write_csv(out / TEST_CSV, test_rows)
    with (out / TRIALS).open("w") as f:
        f.writelines(f"{label} {a} {b}\n" for label, a, b in _trials(spec, test_rows))
    (out / "demo_corpus.json").write_text(json.dumps(dataclasses.asdict(spec), indent=2) + "\n")
    return out


def _call(job):
    fn, *args = job
    return fn(*args)
