"""Streaming verification: embeddings as alone, S-Norm / AS-Norm against the formulas, metrics with intervals."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from data_pipelines import audio_io
from data_pipelines.errors import ConfigError
from ssps_jax import sharding
from ssps_jax import train as train_lib
from ssps_jax.evaluate import evaluate
from ssps_jax.evaluation import metrics, verification
from ssps_jax.evaluation.embedding import Embedder, bucket_lengths
from ssps_jax.features import LogMelConfig
from ssps_jax.models.ecapa_tdnn import ECAPATDNN

RATE = audio_io.SAMPLE_RATE
# Buckets from 4000 samples, 1.5x apart (4000, 6080, 9120, 13600): 9 files in the first (2 batches of 8), 2 in
# two others; few distinct lengths, as the reference embeds each file alone and compiles once per length.
LENGTHS = [3000] * 6 + [4000] * 3 + [5000] * 2 + [12000] * 2


@pytest.fixture(scope="module")
def tiny_model():
    model = ECAPATDNN(
        mel=LogMelConfig(n_mels=16), channels=(16, 16, 16, 16, 48), attention_channels=8, se_channels=8, encoder_dim=8
    )
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((2, 16000)))
    rng = np.random.default_rng(0)  # non-trivial BatchNorm statistics: padding mistakes cannot hide behind zeros
    stats = jax.tree.map(lambda x: x + rng.uniform(0.5, 1.5, x.shape), variables["batch_stats"])
    return model, {"params": variables["params"], "batch_stats": stats}


def _write_files(root, prefix, lengths, seed):
    rng = np.random.default_rng(seed)
    files = []
    for i, n in enumerate(lengths):
        rel = f"{prefix}/spk{i % 4}/s0/{i:03d}.wav"
        audio_io.write_wav(root / rel, 0.1 * rng.standard_normal(n))
        files.append(rel)
    return files


def _trial_list(path, files, seed, n=40):
    rng = np.random.default_rng(seed)
    pairs = [rng.choice(len(files), 2, replace=False) for _ in range(n)]
    lines = [f"{int(a % 4 == b % 4)} {files[a]} {files[b]}\n" for a, b in pairs]
    path.write_text("".join(lines))
    return path


def _verifier(tmp_path, tiny_model, **kwargs):
    model, _ = tiny_model
    files = _write_files(tmp_path, "test", LENGTHS, seed=1)
    trials = _trial_list(tmp_path / "list_a.txt", files, seed=2)
    embedder = Embedder(lambda v, wave, n: model.apply(v, wave, n), sharding.make_mesh(), 4, 1.5, min_bucket=4000)
    return verification.TrialEvaluator([str(trials)], tmp_path, embedder, **kwargs), files


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_streamed_embeddings_equal_each_file_alone_and_each_file_is_read_once(tmp_path, tiny_model, monkeypatch):
    model, variables = tiny_model
    verifier, _ = _verifier(tmp_path, tiny_model, bootstrap=50)
    assert verifier.embedder.batch_size == 8  # rounded up to the 8 devices: 13 files make 4 batches over 3 buckets
    reads = []
    read_audio = audio_io.read_audio
    monkeypatch.setattr(audio_io, "read_audio", lambda path, **kw: reads.append(path) or read_audio(path, **kw))
    results, scores = verifier.evaluate(variables)
    assert sorted(map(str, reads)) == sorted(str(tmp_path / f) for f in verifier.files)  # each once

    emb = verifier.embeddings(variables)
    alone = jax.jit(model.apply)  # unpadded, no mask
    ref = _unit([alone(variables, read_audio(tmp_path / f).samples[None] / 32768.0)[0] for f in verifier.files])
    np.testing.assert_allclose(emb, ref, atol=2e-5)
    buckets = bucket_lengths(max(LENGTHS), 4000, 1.5)
    assert verifier.embedder.program._cache_size() == len(set(np.searchsorted(buckets, verifier.lengths)))
    (t,) = verifier.lists
    cos = np.sum(ref[t.pairs[:, 0]] * ref[t.pairs[:, 1]], axis=1)
    np.testing.assert_allclose(scores["list_a"]["cosine"], cos, atol=5e-5)
    assert set(results["list_a"]) == {"trials", "cosine"}


def test_a_bad_test_file_is_named_before_anything_is_embedded(tmp_path, tiny_model):
    model, _ = tiny_model
    (tmp_path / "a").mkdir()
    audio_io.write_wav(tmp_path / "a" / "good.wav", np.zeros(8000))
    (tmp_path / "a" / "bad.wav").write_bytes(b"not audio at all")
    (tmp_path / "list.txt").write_text("1 a/good.wav a/bad.wav\n")
    embedder = Embedder(lambda v, wave, n: model.apply(v, wave, n), sharding.make_mesh(), 8)
    with pytest.raises(audio_io.AudioFileError, match=r"bad\.wav: unreadable"):
        verification.TrialEvaluator([str(tmp_path / "list.txt")], tmp_path, embedder)


def _side_stats_reference(x, cohort, top_k):
    """Mean and std (ddof 1) of the top_k highest cosines of x with the cohort: sort, slice, NumPy moments."""
    s = np.sort(_unit(cohort) @ _unit(x))[::-1][:top_k]
    return s.mean(), s.std(ddof=1)


def test_normalised_scores_equal_the_formulas_and_metrics_have_intervals(tmp_path, tiny_model):
    _, variables = tiny_model
    cohort_files = _write_files(tmp_path, "train", [int(RATE * s) for s in np.linspace(0.3, 1.2, 24)], seed=3)
    (tmp_path / "train.csv").write_text("File,Speaker\n" + "".join(f"{f},{f.split('/')[1]}\n" for f in cohort_files))
    cohort = verification.Cohort.draw(tmp_path / "train.csv", tmp_path, size=20, seconds=0.5, seed=4)
    assert len(cohort.files) == 20 and set(cohort.files) < set(cohort_files)
    assert verification.Cohort.draw(tmp_path / "train.csv", tmp_path, 20, 0.5, 4) == cohort  # seeded
    assert all(len(cohort.read(i)) <= RATE // 2 for i in range(len(cohort.files)))

    verifier, _ = _verifier(tmp_path, tiny_model, cohort=cohort, normalisations=("s-norm", "as-norm"), top_k=5)
    verifier.bootstrap = 200
    results, scores = verifier.evaluate(variables)
    emb, coh = verifier.embeddings(variables), verifier.cohort_embeddings(variables)
    (t,) = verifier.lists
    for kind, top_k in (("s-norm", 20), ("as-norm", 5)):
        ref = []
        for e, u in t.pairs:
            s = _unit(emb[e]) @ _unit(emb[u])
            (mu_e, sd_e), (mu_t, sd_t) = (
                _side_stats_reference(emb[e], coh, top_k),
                _side_stats_reference(emb[u], coh, top_k),
            )
            ref.append(0.5 * ((s - mu_e) / sd_e + (s - mu_t) / sd_t))
        np.testing.assert_allclose(scores["list_a"][kind], ref, rtol=1e-5, atol=1e-5)

    verifier.write(tmp_path / "out", results, scores, {"step": 3})
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["results"] == results and written["ci"]["confidence"] == 0.95
    for kind in ("cosine", "s-norm", "as-norm"):
        m = written["results"]["list_a"][kind]
        assert set(m) == {
            "eer",
            "eer_ci",
            "min_dcf_0.01",
            "min_dcf_0.01_ci",
            "min_dcf_0.05",
            "min_dcf_0.05_ci",
            "eer_threshold",
        }
        assert m["eer_threshold"] == metrics.eer_threshold(scores["list_a"][kind], verifier.lists[0].labels)
        for name in ("eer", "min_dcf_0.01", "min_dcf_0.05"):
            low, high = m[f"{name}_ci"]
            assert low - 1e-9 <= m[name] <= high + 1e-9 and low < high
        suffix = "" if kind == "cosine" else f".{kind}"
        lines = (tmp_path / "out" / f"list_a{suffix}.scores.txt").read_text().splitlines()
        np.testing.assert_allclose([float(x.split()[0]) for x in lines], scores["list_a"][kind], atol=1e-6)
    lines = verification.summary_lines(results)
    assert len(lines) == 3 and lines[2].startswith("list_a  as-norm  EER ")


def test_cohort_smaller_than_top_k_is_a_config_error(demo_dir):
    config = tiny_config(demo_dir)
    config.eval.score_norm = "as-norm"
    config.eval.cohort_top_k = 300
    config.eval.cohort_size = 200
    with pytest.raises(ConfigError, match=r"config.eval.cohort_top_k: must be in \[2, eval.cohort_size = 200\]"):
        train_lib.config_lib.validate(config)
    config.eval.cohort_size = 20000  # valid, but the demo's train CSV has 240 utterances
    with pytest.raises(ConfigError, match=r"config\.eval\.cohort_top_k: 300 exceeds the cohort's 240 utterances"):
        verification.make_trial_evaluator(train_lib.config_lib.resolve_paths(config), None, sharding.make_mesh())
    config.eval.score_norm = "z-norm"
    with pytest.raises(ConfigError, match=r"config\.eval\.score_norm: unknown normalisation 'z-norm'"):
        train_lib.config_lib.validate(config)


def test_training_logs_every_score_kind_and_evaluate_of_an_ssps_checkpoint_warns_nothing(demo_dir, tmp_path, caplog):
    config = tiny_config(demo_dir)
    config.ssps.enabled = True  # queues fill during epoch 0: the checkpoint holds the SSPS state
    config.ssps.start_epoch = 1
    config.ssps.kmeans_clusters = 8
    config.ssps.pos_queue_size = 48
    config.data.crops.reference_seconds = 1.0
    config.train.epochs = 1
    config.train.global_batch_size = 48  # 5 steps
    config.eval.every_epochs = 1
    config.eval.score_norm = "s-norm,as-norm"
    config.eval.cohort_size = 30
    config.eval.cohort_top_k = 10
    config.eval.cohort_seconds = 1.0
    config.eval.bootstrap = 100
    results = train_lib.train(config, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (logged,) = [r for r in records if r["kind"] == "eval"]
    for kind in ("cosine", "s-norm", "as-norm"):
        for metric in ("eer", "min_dcf_0.01", "min_dcf_0.05"):
            assert logged[f"demo_trials/{kind}/{metric}"] == results["demo_trials"][kind][metric]

    caplog.set_level(logging.WARNING)
    again = evaluate(str(tmp_path))
    assert again == results  # same cohort, crops and bootstrap: eval.seed, not the training state
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
