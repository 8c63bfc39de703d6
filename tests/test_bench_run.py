"""`ssps-jax bench-run`: its VoxCeleb-shaped corpus and what it reads back from a run (the run itself is
train's, tested in test_train.py; docs/benchmarks.md has a dry run of the whole command)."""

import json
import re

import numpy as np
import pytest
import soundfile as sf

from data_pipelines.augment import AugmentConfig, Augmenter
from data_pipelines.manifests import read_utterances
from ssps_jax.bench import real_run


def test_corpus_has_voxcelebs_layout_lengths_and_trials(tmp_path):
    spec = real_run.CorpusSpec(
        speakers=2,
        videos=2,
        utterances=2,
        test_speakers=2,
        trials=8,
        voice_seconds=1.0,
        noise_files=1,
        noise_seconds=0.5,
        rirs=1,
    )
    out = real_run.write_corpus(tmp_path / "corpus", spec, workers=1)
    train = read_utterances(out / "train.csv")
    assert len(train) == spec.train_utterances == 8
    for u in train:
        assert re.fullmatch(r"id0\d{4}/[A-Za-z0-9_-]{11}/\d{5}\.wav", u.file), u.file
        assert u.file.split("/")[:2] == [u.speaker, u.session]
        seconds = sf.info(out / u.file).duration
        assert real_run.MIN_SECONDS <= seconds <= real_run.MAX_SECONDS
    assert len({u.session for u in train}) == spec.speakers * spec.videos
    trials = [line.split() for line in (out / "trials.txt").read_text().splitlines()]
    assert len(trials) == 8 and {label for label, _, _ in trials} == {"0", "1"}
    for label, a, b in trials:
        assert a.startswith("id1") and (out / a).is_file() and (out / b).is_file()
        same_speaker, same_video = a.split("/")[0] == b.split("/")[0], a.split("/")[1] == b.split("/")[1]
        assert (label == "1") == same_speaker and not same_video
    # The augmentation banks are usable as they are laid out.
    draw = Augmenter(AugmentConfig(), out / "musan_split", out / "simulated_rirs").draw(16000, np.random.default_rng(0))
    assert draw.rir is not None and len(draw.noises) == 1
    # Written once: the same spec is reused as it is.
    stamp = (out / "corpus.json").stat().st_mtime_ns
    real_run.write_corpus(tmp_path / "corpus", spec, workers=1)
    assert (out / "corpus.json").stat().st_mtime_ns == stamp


def test_summary_is_the_runs_steady_state(tmp_path):
    lines = [
        {"kind": "train", "step": 10, "loss": 1.0, "samples_per_s": 5.0, "input_wait_share": 0.0, "device_step_s": 9.0},
        {"kind": "checkpoint", "step": 10, "seconds": 0.5},
        {"kind": "ssps", "step": 10, "kmeans_seconds": 1.25},
        {
            "kind": "train",
            "step": 20,
            "loss": 1.0,
            "samples_per_s": 300.0,
            "input_wait_share": 0.1,
            "device_step_s": 0.2,
        },
        {
            "kind": "train",
            "step": 30,
            "loss": 1.0,
            "samples_per_s": 100.0,
            "input_wait_share": 0.5,
            "device_step_s": 0.4,
        },
        {
            "kind": "train",
            "step": 40,
            "loss": 1.0,
            "samples_per_s": 200.0,
            "input_wait_share": 0.3,
            "device_step_s": 0.25,
        },
        {"kind": "checkpoint", "step": 40, "seconds": 1.5},
        {"kind": "eval", "step": 40, "trials/cosine/eer": 0.25, "seconds": 7.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    p = real_run.summarize(tmp_path, batch=64, wall_s=99.0)
    # The first window (start-up, first compile) is left out; medians of the others.
    assert p["steps"] == 40 and p["windows"] == 3
    assert p["e2e_samples_per_s"] == 200.0 and p["input_wait_share"] == 0.3 and p["input_wait_share_max"] == 0.5
    assert p["device_step_s"] == 0.25 and p["device_samples_per_s"] == pytest.approx(256.0)
    assert (p["kmeans_s"], p["eval_s"], p["checkpoint_s"], p["eer"]) == ([1.25], [7.0], [0.5, 1.5], 0.25)
    result = {
        "devices": "1 x cpu",
        "model": "m",
        "batch": 64,
        "train_utterances": 640,
        "train_hours": 1.4,
        "prepare_s": 3.0,
        "epochs": 4,
        "kmeans_clusters": 15,
        "queue": 640,
        "workers": 2,
        "cpus": 2,
        "bench_samples_per_s": 400.0,
        "paths": {"host": p},
    }
    table = real_run.table(result)
    assert "| **e2e samples/s**, median window | **200.0** |" in table
    assert "| e2e / devices' step | 78% |" in table and "| e2e / bench's step (400 samples/s) | 50% |" in table
    assert "| EER (%), cosine | 25.00 |" in table
