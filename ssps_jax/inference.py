"""A trained model outside training: restore it from a workdir, embed recordings, score pairs.

`TrainedModel.from_workdir(W)` is where `evaluate`, `extract`, `score` and the
exports start: the config W was trained with (eval keys it predates take their
defaults, paths resolved under data.base_dir), the method's model, and the
variables evaluation embeds with (DINO: the teacher's), restored from the
newest readable checkpoint or the one of `step`. Nothing else is restored: no
optimizer state, no SSPS queues, so a workdir restores on a machine that could
not hold its training state.

`Verifier` is the Python API on top of it:

    from ssps_jax.inference import Verifier
    v = Verifier.from_workdir("workdirs/demo_simclr/ssps")
    v.score("a.wav", "b.wav")            # cosine of the two embeddings
    v.scores("a.wav", "b.wav")           # {"cosine": ..., "as-norm": ...} with eval.score_norm's cohort
    v.embed(["a.wav", wave_16k])         # (2, D) L2-normalised

An embedding is the model's `embed` of the whole recording, as evaluation
computes it (padding-masked buckets: a recording gives the same embedding
whatever it is batched with); audio is read as evaluation reads it (16 kHz
mono, resampled and downmixed when needed).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import flax.linen as nn
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from data_pipelines import audio_io
from data_pipelines.errors import InputError
from ssps_jax.evaluation import scoring
from ssps_jax.evaluation.embedding import Embedder, l2_normalise
from ssps_jax.evaluation.verification import MIN_SECONDS, RAW, Cohort, embed_fn, score_norms
from ssps_jax.methods.base import Method


def inference_config(
    workdir: epath.PathLike, trials: Sequence[str] | None = None, base_dir: str | None = None
) -> ml_collections.ConfigDict:
    """The config `workdir` was trained with, ready to evaluate: eval keys it predates backfilled, paths resolved.

    `trials` / `base_dir` replace eval.trials / eval.base_dir (relative trial lists resolve under data.base_dir).
    """
    from ssps_jax import config as config_lib
    from ssps_jax.train import load_config

    config = load_config(workdir)
    with config.unlocked():
        # Workdirs trained before an eval key existed evaluate with its default.
        for key, default in config_lib.base_config().eval.items():
            if key not in config.eval:
                config.eval[key] = default
        if trials:
            config.eval.trials = tuple(trials)
        if base_dir:
            config.eval.base_dir = base_dir
    config_lib.validate_scoring(config.eval)
    return config_lib.resolve_paths(config)


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A workdir's model and the variables it embeds with, on `mesh` (replicated)."""

    workdir: epath.Path
    step: int  # the checkpoint restored
    config: ml_collections.ConfigDict  # paths resolved
    mesh: Mesh
    method: Method
    model: nn.Module
    variables: dict  # {"params", "batch_stats"} of the embedding model (DINO: the teacher's)

    @classmethod
    def from_workdir(
        cls,
        workdir: epath.PathLike,
        step: int | None = None,
        *,
        config: ml_collections.ConfigDict | None = None,
        mesh: Mesh | None = None,
    ) -> TrainedModel:
        """Restores checkpoint `step` of `workdir` (default: the newest readable one; damaged ones are skipped
        with a warning and left where they are). `config`: inference_config(workdir) unless given."""
        from ssps_jax import checkpoint, sharding
        from ssps_jax.build import build_for_inference

        config = inference_config(workdir) if config is None else config
        mesh = sharding.make_mesh() if mesh is None else mesh
        method, model, state = build_for_inference(config, mesh)
        ckpt = checkpoint.Checkpointer(epath.Path(workdir) / "checkpoints", read_only=True)
        try:  # a checkpoint of another model than `config`'s is refused (CheckpointMismatchError), nothing restored
            step, state, _ = ckpt.restore_for_use(state, step, config)
        finally:
            ckpt.close()
        return cls(epath.Path(workdir), int(step), config, mesh, method, model, method.eval_variables(state))

    def embed_fn(self) -> Callable:
        """(variables, wave (B, L), lengths (B,)) -> (B, D) raw embeddings: the function evaluation compiles."""
        return embed_fn(self.model)

    def embedder(self, batch_size: int | None = None) -> Embedder:
        """Bucketed, padding-masked embedding on the mesh, with eval's buckets (and batch size unless given)."""
        e = self.config.eval
        return Embedder(
            self.embed_fn(),
            self.mesh,
            e.batch_size if batch_size is None else batch_size,
            bucket_ratio=e.bucket_ratio,
            min_bucket=round(e.min_bucket_seconds * audio_io.SAMPLE_RATE),
        )


Audio = str | os.PathLike | np.ndarray  # a file (any format `prepare` reads) or a 16 kHz mono waveform (int16 or float)


class Verifier:
    """Embeds recordings with a trained model and scores pairs of them (cosine; S-Norm / AS-Norm with a cohort)."""

    def __init__(self, trained: TrainedModel, cohort: Cohort | None = None):
        self.trained = trained
        # One recording per device and batch: scoring a pair embeds 2 recordings, not eval.batch_size copies.
        self._embedder = trained.embedder(batch_size=trained.mesh.size)
        self.cohort = cohort
        self._cohort_embeddings: np.ndarray | None = None
        self.normalisations = score_norms(trained.config.eval.score_norm) if cohort is not None else ()

    @classmethod
    def from_workdir(cls, workdir: epath.PathLike, step: int | None = None, *, normalise: bool = True) -> Verifier:
        """The model of `workdir` (checkpoint `step`, default the newest); with `normalise` and eval.score_norm
        set, the cohort evaluation draws (eval.cohort_size utterances of data.train_csv) for normalised scores."""
        trained = TrainedModel.from_workdir(workdir, step)
        e, data = trained.config.eval, trained.config.data
        cohort = None
        if normalise and score_norms(e.score_norm):
            if not epath.Path(data.train_csv).is_file():
                raise InputError(
                    f"eval.score_norm is {e.score_norm!r}, but the cohort's train CSV {data.train_csv} is not here: "
                    "pass normalise=False (cosine scores only)"
                )
            cohort = Cohort.draw(data.train_csv, data.base_dir, e.cohort_size, e.cohort_seconds, e.seed)
        return cls(trained, cohort)

    @property
    def step(self) -> int:
        return self.trained.step

    def embed(self, audio: Audio | Sequence[Audio]) -> np.ndarray:
        """L2-normalised float32 embeddings: (D,) for one recording, (N, D) for a list."""
        one = isinstance(audio, (str, os.PathLike)) or (isinstance(audio, np.ndarray) and audio.ndim == 1)
        waves = [_waveform(a) for a in ([audio] if one else audio)]
        emb = l2_normalise(self._embedder(self.trained.variables, waves)).astype(np.float32)
        return emb[0] if one else emb

    def score(self, a: Audio, b: Audio) -> float:
        """Cosine of the embeddings of `a` and `b` (the raw score evaluation reports as "cosine")."""
        ea, eb = self.embed([a, b])
        return float(np.dot(ea.astype(np.float64), eb))

    def scores(self, a: Audio, b: Audio) -> dict[str, float]:
        """{"cosine": ..., and each of eval.score_norm's normalisations when the Verifier has a cohort}."""
        emb = self.embed([a, b])
        pair = np.array([[0, 1]], np.int32)
        raw = scoring.cosine_scores(emb, pair)
        out = {RAW: float(raw[0])}
        if self.normalisations:
            cohort = self.cohort_embeddings()
            e = self.trained.config.eval
            for norm in self.normalisations:
                stats = scoring.cohort_stats(emb, cohort, e.cohort_top_k if norm == "as-norm" else None)
                out[norm] = float(scoring.normalise(raw, pair, *stats)[0])
        return out

    def cohort_embeddings(self) -> np.ndarray:
        """(C, D) the cohort's embeddings, computed once, as evaluation does (one crop per utterance)."""
        if self._cohort_embeddings is None:
            c = self.cohort
            emb = self.trained.embedder().embed(
                self.trained.variables, c.lengths(), c.read, names=lambda i: str(c.base_dir / c.files[i])
            )
            self._cohort_embeddings = l2_normalise(emb).astype(np.float32)
        return self._cohort_embeddings


@dataclasses.dataclass(frozen=True)
class Threshold:
    """A decision threshold on one kind of score (accept: score >= value), and where it came from."""

    value: float
    kind: str  # "cosine", "s-norm", "as-norm"
    source: str

    def decide(self, score: float) -> str:
        return "same" if score >= self.value else "different"


def stored_threshold(workdir: epath.PathLike, kind: str, step: int) -> Threshold | None:
    """The EER threshold of `kind` scores that an evaluation stored in `workdir`: that of checkpoint `step`'s
    evaluation, else of the newest one; of its first trial list. None when no evaluation stored one."""
    import json

    found = epath.Path(workdir).glob("eval/step_*/metrics.json")
    evaluations = {int(p.parent.name.removeprefix("step_")): p for p in found}
    if not evaluations:
        return None
    at = step if step in evaluations else max(evaluations)
    path = evaluations[at]
    results = json.loads(path.read_text()).get("results", {})
    for name, r in results.items():  # the first list the evaluation ran (eval.trials' order)
        value = r.get(kind, {}).get("eer_threshold")
        if value is not None:
            model = "" if at == step else f", not of the checkpoint scored (step {step})"
            return Threshold(float(value), kind, f"the EER threshold of {name} at step {at}{model}, from {path}")
    return None


def _waveform(audio: Audio) -> np.ndarray:
    if isinstance(audio, (str, os.PathLike)):
        return audio_io.read_audio(audio, min_seconds=MIN_SECONDS).samples
    wave = np.asarray(audio)
    if wave.ndim != 1 or wave.size < MIN_SECONDS * audio_io.SAMPLE_RATE:
        raise InputError(
            f"a waveform to embed must be 1-D 16 kHz audio of at least {MIN_SECONDS:g} s; got shape {wave.shape}"
        )
    if wave.dtype != np.int16 and not np.all(np.isfinite(wave)):
        raise InputError("the waveform to embed has non-finite samples")
    return wave
