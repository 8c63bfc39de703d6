"""Speaker verification on VoxCeleb-format trial lists (docs/method.md §9).

Each test utterance is embedded whole, L2-normalised, and a trial's score is
the cosine of its two embeddings. Audio of every listed file is read once,
when the Verifier is built (a bad file is an error naming it), and kept in
memory as int16 for every later evaluation.
"""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import ml_collections
import numpy as np
from jax.sharding import Mesh

from data_pipelines import audio_io
from data_pipelines.manifests import Trial, read_trials
from ssps_jax.evaluation import metrics
from ssps_jax.evaluation.embedding import Embedder, l2_normalise


def trial_list_name(path: str | Path) -> str:
    name = Path(path).name
    return name[: -len(".txt")] if name.endswith(".txt") else name


class Verifier:
    def __init__(self, trial_paths: list[str], base_dir: str | Path, embedder: Embedder, read_threads: int = 8):
        self.embedder = embedder
        self.trials: dict[str, list[Trial]] = {
            trial_list_name(p): read_trials(p, base_dir=base_dir) for p in trial_paths
        }
        self.files = sorted({f for ts in self.trials.values() for t in ts for f in (t.enrol, t.test)})
        base = Path(base_dir)
        with concurrent.futures.ThreadPoolExecutor(read_threads) as pool:
            self.audio = list(pool.map(lambda f: audio_io.read_audio(base / f, min_seconds=0.1).samples, self.files))

    def embeddings(self, variables) -> np.ndarray:
        """(files, D) L2-normalised embeddings, in the order of `self.files`."""
        return l2_normalise(self.embedder(variables, self.audio))

    def evaluate(self, variables) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
        """Per trial list: {"eer", "min_dcf", "trials"} (fractions), and the raw scores."""
        emb = self.embeddings(variables)
        row = {f: i for i, f in enumerate(self.files)}
        results, scores = {}, {}
        for name, trials in self.trials.items():
            enrol = emb[[row[t.enrol] for t in trials]]
            test = emb[[row[t.test] for t in trials]]
            s = np.sum(enrol * test, axis=1)
            labels = np.array([t.label for t in trials])
            scores[name] = s
            results[name] = {
                "eer": metrics.eer(s, labels),
                "min_dcf": metrics.min_dcf(s, labels, p_target=0.01),
                "trials": len(trials),
            }
        return results, scores

    def write(self, out_dir: str | Path, results: dict, scores: dict, extra: dict | None = None) -> None:
        """metrics.json and, per trial list, `<name>.scores.txt` ("score label enrol test")."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({**(extra or {}), "results": results}, indent=2) + "\n")
        for name, s in scores.items():
            with (out / f"{name}.scores.txt").open("w") as f:
                f.writelines(f"{score:.6f} {t.label} {t.enrol} {t.test}\n" for score, t in zip(s, self.trials[name]))


def embed_fn(model):
    """(variables, wave, lengths) -> embeddings: the model's `embed`, the function evaluation compiles per bucket."""

    def embed(variables, wave, lengths):
        return model.apply(variables, wave, lengths, method=type(model).embed)

    return embed


def make_verifier(config: ml_collections.ConfigDict, model, mesh: Mesh) -> Verifier | None:
    """Evaluation of `model` (its `embed`) on config.eval.trials, or None when there are none."""
    if not config.eval.trials:
        return None
    embedder = Embedder(
        embed_fn(model),
        mesh,
        config.eval.batch_size,
        bucket_ratio=config.eval.bucket_ratio,
        min_bucket=round(config.eval.min_bucket_seconds * 16000),
    )
    return Verifier(list(config.eval.trials), config.eval.base_dir or config.data.base_dir, embedder)
