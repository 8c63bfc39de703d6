"""DINO-SSPS training end to end: the schedule, evaluation with the teacher, resume mid-SSPS."""

import json

import jax
import numpy as np
import pytest
from conftest import tiny_dino_config

from ssps_jax import train as train_lib

STEPS_PER_EPOCH = 240 // 16
START = 1  # epoch 0 plain and filling the queues, epoch 1 sampling


class Interrupted(Exception):
    pass


def dino_ssps_config(demo_dir):
    config = tiny_dino_config(demo_dir)
    config.ssps.enabled = True
    config.ssps.start_epoch = START
    config.ssps.kmeans_clusters = 24
    config.ssps.pos_queue_size = 48
    config.train.epochs = 2
    config.eval.every_epochs = 2
    return config


def _records(workdir, kind):
    return [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def uninterrupted(demo_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dino")
    states = {}

    def keep(done, state):
        if done in (STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH):
            states[done] = jax.device_get(state)

    results = train_lib.train(dino_ssps_config(demo_dir), workdir, on_step=keep)
    return workdir, states, results


def test_dino_ssps_trains_queues_both_views_and_evaluates_the_teacher(uninterrupted):
    workdir, states, results = uninterrupted
    train = _records(workdir, "train")
    assert all(r["ssps/coverage"] > 0 for r in train if r["step"] > STEPS_PER_EPOCH)
    assert all(r["ssps/coverage"] == 0 for r in train if r["step"] <= STEPS_PER_EPOCH)
    end = states[2 * STEPS_PER_EPOCH]
    assert end.ssps.pos_emb.shape[0] == 2 and end.ssps.pos_emb.shape[-1] == 64  # two 64-wide teacher views
    assert np.all(end.ssps.pos_index >= 0)
    # tau grew along its cosine and the teacher differs from the student.
    # The step logged as 1 ran from step 0: tau starts at 0.996; the last one is close to 1.
    assert train[0]["tau"] == pytest.approx(0.996, abs=1e-7)
    assert train[-1]["tau"] == pytest.approx(1 - 0.004 * (1 - np.cos(np.pi / 30)) / 2, abs=1e-6)
    assert train[-1]["tau"] > train[0]["tau"]
    diff = jax.tree.map(lambda t, s: float(np.abs(t - s).max()), end.method_state["teacher"]["params"], end.params)
    assert max(jax.tree.leaves(diff)) > 1e-4
    # Evaluation embeds with the teacher: the reported EER is the teacher's.
    evaluation = json.loads((workdir / "eval" / f"step_{2 * STEPS_PER_EPOCH}" / "metrics.json").read_text())
    assert evaluation["results"] == results


def test_dino_resume_in_the_ssps_phase_reproduces_the_losses(demo_dir, tmp_path, uninterrupted):
    reference_dir, _, _ = uninterrupted
    reference = {r["step"]: r["loss"] for r in _records(reference_dir, "train")}
    workdir = tmp_path / "resumed"
    config = dino_ssps_config(demo_dir)

    def kill(done, state):
        if done == STEPS_PER_EPOCH + 4:  # mid-epoch 1: resumes from step 23 with its clustering
            raise Interrupted

    config.train.checkpoint_every_steps = STEPS_PER_EPOCH + 2
    with pytest.raises(Interrupted):
        train_lib.train(config, workdir, on_step=kill)
    train_lib.train(config, workdir)
    resumed = {r["step"]: r["loss"] for r in _records(workdir, "train")}
    assert sorted(resumed) == sorted(reference)
    np.testing.assert_allclose([resumed[s] for s in reference], list(reference.values()), rtol=1e-6)
