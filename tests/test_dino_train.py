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
def run(demo_dir, tmp_path_factory):
    """A DINO-SSPS run killed at its last step, its last checkpoint mid-epoch 1 (step 17, with that epoch's
    clustering), then resumed: the killed run's records of steps 18-29 are the reference the resumed run's
    must equal. Returns (workdir, states after epochs 0 and 1, the final evaluation, the killed run's losses)."""
    workdir = tmp_path_factory.mktemp("dino")
    config = dino_ssps_config(demo_dir)
    config.train.checkpoint_every_steps = STEPS_PER_EPOCH + 2
    states = {}

    def keep_then_kill(done, state):
        if done in (STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH):
            states[done] = jax.device_get(state)
        if done == 2 * STEPS_PER_EPOCH:  # before the epoch-end checkpoint and evaluation
            raise Interrupted

    with pytest.raises(Interrupted):
        train_lib.train(config, workdir, on_step=keep_then_kill)
    killed = {r["step"]: r["loss"] for r in _records(workdir, "train")}
    results = train_lib.train(config, workdir)
    return workdir, states, results, killed


def test_dino_ssps_trains_queues_both_views_and_evaluates_the_teacher(run):
    workdir, states, results, _ = run
    train = list({r["step"]: r for r in _records(workdir, "train")}.values())  # a step logged twice: as resumed
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


def test_dino_resume_in_the_ssps_phase_reproduces_the_losses(run):
    workdir, _, _, killed = run
    assert sorted(killed) == list(range(1, 2 * STEPS_PER_EPOCH))
    again = {r["step"]: r["loss"] for r in _records(workdir, "train")[len(killed) :]}
    assert sorted(again) == list(range(STEPS_PER_EPOCH + 3, 2 * STEPS_PER_EPOCH + 1))
    redone = range(STEPS_PER_EPOCH + 3, 2 * STEPS_PER_EPOCH)
    np.testing.assert_allclose([again[s] for s in redone], [killed[s] for s in redone], rtol=1e-6)
