"""Speaker verification on VoxCeleb-format trial lists (docs/method.md §9).

Each test utterance is embedded whole, L2-normalised, and a trial's score is
the cosine of its two embeddings; optionally also S-Norm / AS-Norm scores
against a cohort of train utterances (scoring.py). Every score set gets EER
and minDCF at P_target 0.01 and 0.05 (metrics.py), each with a bootstrap
confidence interval (scoring.bootstrap_metrics: trials resampled with
replacement within each class).

Streaming (VoxCeleb1-E: 145,160 utterances, 579,818 trials, in bounded host
memory). Building a TrialEvaluator parses the trial lists into index pairs into one
table of unique files (`files`), checks that every file exists (one error
listing the missing ones) and takes each file's length from its header
(libsndfile; decoding the file when the header cannot tell, e.g. m4a), so a
bad file fails before any embedding. No audio is kept: each `evaluate` reads
the files again, batch by batch in a thread pool (embedding.Embedder.embed),
and keeps only their embeddings.

Cohort (scoring.py's S-Norm / AS-Norm): `eval.cohort_size` utterances of
data.train_csv drawn without replacement with eval.seed, each cropped to
`eval.cohort_seconds` at a start drawn from eval.seed and the utterance's
index (sslsv embeds its cohort, every train utterance, as its test task
configures: by default one random 4 s crop), and embedded by the model under
evaluation at every evaluation. The trial lists' speakers are not removed
from the cohort: VoxCeleb2 dev (the train CSV) and VoxCeleb1 share none, and
`make-csv --exclude-trials` removes them from other train CSVs.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import time

import ml_collections
import numpy as np
import soundfile as sf
from etils import epath
from jax.sharding import Mesh

from data_pipelines import audio_io, paths
from data_pipelines.errors import ConfigError, InputError
from data_pipelines.manifests import csv_text, read_trials
from ssps_jax import storage
from ssps_jax.evaluation import metrics, scoring
from ssps_jax.evaluation.embedding import Embedder, l2_normalise

RAW = "cosine"  # the name of the raw scores beside the normalisations "s-norm" and "as-norm"
NORMALISATIONS = ("s-norm", "as-norm")
MIN_SECONDS = 0.1  # shorter test files are errors: too short to embed


def trial_list_name(path: epath.PathLike) -> str:
    name = epath.Path(path).name
    return name[: -len(".txt")] if name.endswith(".txt") else name


def default_config() -> dict:
    """`config.eval`: trial lists, when to evaluate, the embedding batches, score normalisation, CIs."""
    return {
        "trials": (),  # VoxCeleb-format trial lists; names are their file names
        "base_dir": "",  # their paths are relative to it; "" means data.base_dir
        "every_epochs": 1,  # 0: only when asked (ssps-jax evaluate)
        "at_start": False,  # also evaluate the untrained encoder
        "batch_size": 32,  # utterances per embedding batch, rounded up to the device count
        "bucket_ratio": 1.25,  # padded lengths grow geometrically by this factor
        "min_bucket_seconds": 2.0,
        # Score normalisation reported beside the raw cosine (ssps_jax/evaluation/verification.py):
        # "" (none), "s-norm", "as-norm" or both, comma-separated ("s-norm,as-norm").
        "score_norm": "",
        # The cohort: this many data.train_csv utterances drawn with eval.seed (all of them if fewer).
        # sslsv uses every train utterance: for VoxCeleb2, 1.09 M crops (1,200 h of audio) to embed at each
        # evaluation and 4.5 GB of float64 embeddings at D = 512; 20,000 cover ~96% of its 5,994 speakers.
        "cohort_size": 20000,
        "cohort_seconds": 4.0,  # one crop per cohort utterance at a random start (sslsv's frame_length 64000); 0: whole
        "cohort_top_k": 300,  # AS-Norm: highest cohort scores per utterance (sslsv's score_norm_cohort_size)
        "bootstrap": 1000,  # resamples of the trials for the confidence intervals of EER and minDCF
        "confidence": 0.95,  # their level
        "seed": 0,  # cohort draw, crops and bootstrap: not the training seed, so runs compare on one cohort
    }


def validate(e: ml_collections.ConfigDict, fail) -> None:
    """Checks `config.eval` but its files (config.validate resolves and checks the trial lists);
    `fail(key, message)` raises."""
    if e.bucket_ratio <= 1:
        fail("eval.bucket_ratio", f"must be > 1, got {e.bucket_ratio}")
    if e.batch_size < 1:
        fail("eval.batch_size", f"must be >= 1, got {e.batch_size}")
    validate_scoring(e, fail)


def validate_scoring(e: ml_collections.ConfigDict, fail) -> None:
    """The score normalisation and confidence-interval keys of `config.eval` (also run by `ssps-jax evaluate`)."""
    norms = score_norms(e.score_norm)
    if unknown := [n for n in norms if n not in NORMALISATIONS]:
        fail("eval.score_norm", f"unknown normalisation {unknown[0]!r}: use {', '.join(NORMALISATIONS)} or ''")
    if norms and e.cohort_size < 2:
        fail("eval.cohort_size", f"must be >= 2 for {e.score_norm}, got {e.cohort_size}")
    if "as-norm" in norms and not 1 < e.cohort_top_k <= e.cohort_size:
        fail(
            "eval.cohort_top_k", f"must be in [2, eval.cohort_size = {e.cohort_size}] for AS-Norm, got {e.cohort_top_k}"
        )
    if e.cohort_seconds < 0:
        fail("eval.cohort_seconds", f"must be >= 0, got {e.cohort_seconds}")
    if e.bootstrap < 1:
        fail("eval.bootstrap", f"must be >= 1, got {e.bootstrap}")
    if not 0 < e.confidence < 1:
        fail("eval.confidence", f"must be in (0, 1), got {e.confidence}")


def score_norms(value: str) -> tuple[str, ...]:
    """eval.score_norm ("", "as-norm", "s-norm,as-norm", ...) as a tuple of names."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


@dataclasses.dataclass(frozen=True)
class TrialList:
    name: str
    pairs: np.ndarray  # (T, 2) int32: rows (enrol, test) into the TrialEvaluator's `files`
    labels: np.ndarray  # (T,) int8: 1 target, 0 non-target


def read_trial_lists(lists: list[str], base_dir: epath.PathLike) -> tuple[list[str], list[TrialList]]:
    """(unique files, sorted; each list as index pairs into them). Every listed file must exist under base_dir."""
    parsed = [(trial_list_name(p), read_trials(p, base_dir=base_dir)) for p in lists]
    files = sorted({f for _, trials in parsed for t in trials for f in (t.enrol, t.test)})
    row = {f: i for i, f in enumerate(files)}
    lists = []
    for name, trials in parsed:
        pairs = np.array([(row[t.enrol], row[t.test]) for t in trials], np.int32)
        lists.append(TrialList(name, pairs, np.array([t.label for t in trials], np.int8)))
    return files, lists


def audio_length(path: epath.Path) -> int:
    """Samples of `path` at 16 kHz: from its header when it is 16 kHz and libsndfile reads it, else by decoding."""
    try:
        with paths.readable(path) as source:
            info = sf.info(source)
        frames = info.frames if info.samplerate == audio_io.SAMPLE_RATE else 0
    except (sf.LibsndfileError, RuntimeError, ValueError):
        frames = 0
    if frames <= 0:  # no usable header: decode (read_audio names the file if it cannot)
        return len(audio_io.read_audio(path, min_seconds=MIN_SECONDS).samples)
    if frames < MIN_SECONDS * audio_io.SAMPLE_RATE:
        raise audio_io.AudioFileError(path, f"too short ({frames / audio_io.SAMPLE_RATE:.2f} s < {MIN_SECONDS:g} s)")
    return frames


def audio_lengths(files: list[epath.Path], threads: int = 8) -> list[int]:
    """`audio_length` of every file, read in a thread pool (headers: I/O-bound)."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(audio_length, files))


@dataclasses.dataclass(frozen=True)
class Cohort:
    """Train utterances whose embeddings score the impostor statistics of S-Norm / AS-Norm."""

    files: list[str]  # relative to base_dir
    base_dir: epath.Path
    crop: int  # samples; 0: whole utterances
    seed: int

    @classmethod
    def draw(cls, train_csv: epath.PathLike, base_dir: epath.PathLike, size: int, seconds: float, seed: int) -> Cohort:
        """`size` files of the CSV's File column (all when it has fewer), drawn without replacement with `seed`."""
        files = [row["File"] for row in csv.DictReader(csv_text(train_csv))]
        rng = np.random.default_rng(seed)
        picked = [files[i] for i in np.sort(rng.choice(len(files), min(size, len(files)), replace=False))]
        if missing := [f for f in picked if not (epath.Path(base_dir) / f).is_file()]:  # fail now, not mid-evaluation
            raise InputError(f"{train_csv}: {len(missing)} cohort file(s) not under {base_dir}, e.g. {missing[0]}")
        return cls(picked, epath.Path(base_dir), round(seconds * audio_io.SAMPLE_RATE), seed)

    def lengths(self, threads: int = 8) -> list[int]:
        """Upper bounds of the cropped lengths: the crop itself (no header read: one bucket), or the whole file's."""
        if self.crop:
            return [self.crop] * len(self.files)
        return audio_lengths([self.base_dir / f for f in self.files], threads)

    def read(self, i: int) -> np.ndarray:
        samples = audio_io.read_audio(self.base_dir / self.files[i], min_seconds=MIN_SECONDS).samples
        if not self.crop or len(samples) <= self.crop:
            return samples
        start = np.random.default_rng([self.seed, i]).integers(0, len(samples) - self.crop + 1)
        return samples[start : start + self.crop]


class TrialEvaluator:
    def __init__(
        self,
        trial_paths: list[str],
        base_dir: epath.PathLike,
        embedder: Embedder,
        cohort: Cohort | None = None,
        normalisations: tuple[str, ...] = (),
        top_k: int = scoring.AS_NORM_TOP_K,
        bootstrap: int = 1000,
        confidence: float = 0.95,
        seed: int = 0,
        read_threads: int = 8,
    ):
        if normalisations and cohort is None:
            raise ValueError(f"{normalisations} need a cohort")
        self.embedder = embedder
        self.base_dir = epath.Path(base_dir)
        self.files, self.lists = read_trial_lists(trial_paths, base_dir)
        self.read_threads = read_threads
        self.lengths = audio_lengths([self.base_dir / f for f in self.files], read_threads)
        self.cohort = cohort
        self.cohort_lengths = cohort.lengths(read_threads) if cohort and normalisations else None
        self.normalisations = tuple(normalisations)
        self.top_k, self.bootstrap, self.confidence, self.seed = top_k, bootstrap, confidence, seed
        self.timings: dict[str, float] = {}  # seconds per phase of the last `evaluate`

    def _read(self, i: int) -> np.ndarray:
        return audio_io.read_audio(self.base_dir / self.files[i], min_seconds=MIN_SECONDS).samples

    def embeddings(self, variables) -> np.ndarray:
        """(files, D) L2-normalised embeddings, in the order of `self.files`; the audio is streamed."""
        emb = self.embedder.embed(
            variables, self.lengths, self._read, self.read_threads, names=lambda i: str(self.base_dir / self.files[i])
        )
        return l2_normalise(emb).astype(np.float32)

    def cohort_embeddings(self, variables) -> np.ndarray:
        c = self.cohort
        emb = self.embedder.embed(
            variables, self.cohort_lengths, c.read, self.read_threads, names=lambda i: str(c.base_dir / c.files[i])
        )
        return l2_normalise(emb).astype(np.float32)

    def scores(self, variables) -> dict[str, dict[str, np.ndarray]]:
        """Per trial list: {"cosine": (T,), and each normalisation's (T,)} scores, in list order."""
        clock = _Clock(self.timings)
        emb = self.embeddings(variables)
        clock("embed test files")
        stats = {}
        if self.normalisations:
            cohort = self.cohort_embeddings(variables)
            clock("embed cohort")
            for norm in self.normalisations:  # each utterance's statistics once, for every list
                stats[norm] = scoring.cohort_stats(emb, cohort, self.top_k if norm == "as-norm" else None)
            clock("cohort statistics")
        out = {}
        for t in self.lists:
            raw = scoring.cosine_scores(emb, t.pairs)
            out[t.name] = {RAW: raw, **{n: scoring.normalise(raw, t.pairs, *stats[n]) for n in self.normalisations}}
        clock("trial scores")
        return out

    def evaluate(self, variables) -> tuple[dict[str, dict], dict[str, dict[str, np.ndarray]]]:
        """Per trial list: {"trials": T, "cosine": metrics, each normalisation: metrics}, and the scores.

        metrics: {"eer", "min_dcf_0.01", "min_dcf_0.05"} (fractions), each one's "<name>_ci": [low, high], and
        "eer_threshold", the score threshold at the EER (metrics.eer_threshold).
        `timings` then holds the seconds of each phase.
        """
        self.timings.clear()
        scores = self.scores(variables)
        clock = _Clock(self.timings)
        results = {}
        for t in self.lists:
            results[t.name] = {"trials": len(t.labels)}
            for kind, s in scores[t.name].items():
                results[t.name][kind] = self._metrics(s, t.labels)
        clock("metrics and bootstrap")
        return results, scores

    def _metrics(self, scores: np.ndarray, labels: np.ndarray) -> dict[str, float | list[float]]:
        point = metrics.from_rates(*metrics.operating_points(scores, labels))
        ci = scoring.bootstrap_metrics(scores, labels, self.bootstrap, self.confidence, self.seed)
        out = {k: v for name in point for k, v in ((name, float(point[name])), (f"{name}_ci", list(ci[name])))}
        return {**out, "eer_threshold": metrics.eer_threshold(scores, labels)}  # `ssps-jax score` decides with it

    def write(self, out_dir: epath.PathLike, results: dict, scores: dict, extra: dict | None = None) -> None:
        """Per trial list and score kind `<list>[.<norm>].scores.txt` ("score label enrol test"), then metrics.json.

        metrics.json is written last, so that its presence means the evaluation's outputs are complete
        (a resumed run evaluates again a step whose metrics.json is missing); a full disk stops with one line.
        """
        out = epath.Path(out_dir)
        with storage.writing(out, "evaluation results"):
            out.mkdir(parents=True, exist_ok=True)
            for t in self.lists:
                for kind, s in scores[t.name].items():
                    suffix = "" if kind == RAW else f".{kind}"
                    with (out / f"{t.name}{suffix}.scores.txt").open("w") as f:
                        f.writelines(
                            f"{score:.6f} {label} {self.files[e]} {self.files[u]}\n"
                            for score, label, (e, u) in zip(s, t.labels, t.pairs)
                        )
            settings = {"ci": {"confidence": self.confidence, "bootstrap_resamples": self.bootstrap, "seed": self.seed}}
            if self.normalisations:
                settings["cohort"] = {"utterances": len(self.cohort.files), "crop_samples": self.cohort.crop}
                settings["cohort"]["as_norm_top_k"] = self.top_k
            (out / "metrics.json").write_text(
                json.dumps({**(extra or {}), **settings, "results": results}, indent=2) + "\n"
            )


class _Clock:
    """Records the seconds since the previous call under each name."""

    def __init__(self, into: dict[str, float]):
        self.into, self.last = into, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.into[name] = self.into.get(name, 0.0) + now - self.last
        self.last = now


def summary_lines(results: dict) -> list[str]:
    """One line per trial list and score kind: EER and minDCFs with their intervals."""
    lines = []
    for name, r in results.items():
        for kind, m in r.items():
            if kind == "trials":
                continue
            parts = [f"EER {100 * m['eer']:.2f}% [{100 * m['eer_ci'][0]:.2f}, {100 * m['eer_ci'][1]:.2f}]"]
            for p in metrics.P_TARGETS:
                v, (lo, hi) = m[f"min_dcf_{p:g}"], m[f"min_dcf_{p:g}_ci"]
                parts.append(f"minDCF{p:g} {v:.4f} [{lo:.4f}, {hi:.4f}]")
            lines.append(f"{name}  {kind:<7}  " + "  ".join(parts) + f"  ({r['trials']} trials)")
    return lines


def scalars(results: dict) -> dict[str, float]:
    """TensorBoard / metrics.jsonl scalars: `<list>/<kind>/<metric>` for every point estimate."""
    return {
        f"{name}/{kind}/{metric}": value
        for name, r in results.items()
        for kind, m in r.items()
        if kind != "trials"
        for metric, value in m.items()
        if not metric.endswith("_ci")
    }


def embed_fn(model):
    """(variables, wave, lengths) -> embeddings: the model's `embed`, the function evaluation compiles per bucket."""

    def embed(variables, wave, lengths):
        return model.apply(variables, wave, lengths, method=type(model).embed)

    return embed


def make_trial_evaluator(config: ml_collections.ConfigDict, model, mesh: Mesh) -> TrialEvaluator | None:
    """Evaluation of `model` (its `embed`) on config.eval.trials, or None when there are none.

    `config`'s paths must be resolved (config.resolve_paths). Reads every test file's header, and the
    cohort's train CSV: a missing or bad file, or a cohort smaller than eval.cohort_top_k, fails here.
    """
    e = config.eval
    if not e.trials:
        return None
    embedder = Embedder(
        embed_fn(model),
        mesh,
        e.batch_size,
        bucket_ratio=e.bucket_ratio,
        min_bucket=round(e.min_bucket_seconds * audio_io.SAMPLE_RATE),
    )
    norms = score_norms(e.score_norm)
    cohort = None
    if norms:
        cohort = Cohort.draw(config.data.train_csv, config.data.base_dir, e.cohort_size, e.cohort_seconds, e.seed)
        if "as-norm" in norms and e.cohort_top_k > len(cohort.files):
            raise ConfigError(
                f"config.eval.cohort_top_k: {e.cohort_top_k} exceeds the cohort's {len(cohort.files)} utterances "
                f"({config.data.train_csv} has no more)"
            )
    return TrialEvaluator(
        list(e.trials),
        e.base_dir or config.data.base_dir,
        embedder,
        cohort,
        norms,
        top_k=e.cohort_top_k,
        bootstrap=e.bootstrap,
        confidence=e.confidence,
        seed=e.seed,
    )
