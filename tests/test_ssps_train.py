"""SimCLR-SSPS training: queue write positions, schedule, resume mid-SSPS, compile counts."""

import json
import logging
import shutil

import jax
import numpy as np
import pytest
from conftest import tiny_config

from data_pipelines import input_pipeline
from ssps_jax import train as train_lib

STEPS_PER_EPOCH = 240 // 16
START = 2  # epoch 0 plain, epoch 1 fills the queues, epochs 2 and 3 sample


def ssps_config(demo_dir):
    config = tiny_config(demo_dir)
    config.ssps.enabled = True
    config.ssps.start_epoch = START
    config.ssps.kmeans_clusters = 24
    config.ssps.pos_queue_size = 100  # -> 96 rows: 6 blocks of 16
    config.ssps.inter_sampling_size = 1
    config.data.crops.reference_seconds = 1.0
    config.train.epochs = 4
    return config


class Interrupted(Exception):
    pass


def _records(workdir, kind):
    return [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def uninterrupted(demo_dir, tmp_path_factory):
    config = ssps_config(demo_dir)
    workdir = tmp_path_factory.mktemp("ssps")
    states = {}
    compiles = []

    class Count(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Finished XLA compilation of"):
                compiles.append(record.getMessage())

    handler = Count()
    logging.getLogger("jax").addHandler(handler)
    jax.config.update("jax_log_compiles", True)
    try:

        def keep(done, state):
            if done % STEPS_PER_EPOCH == 0:  # the states the tests look at
                states[done] = jax.device_get(state)

        train_lib.train(config, workdir, on_step=keep)
    finally:
        jax.config.update("jax_log_compiles", False)
        logging.getLogger("jax").removeHandler(handler)
    return config, workdir, states, compiles


def test_queue_writes_follow_the_spec_positions(demo_dir, demo_source, uninterrupted):
    config, _, states, _ = uninterrupted
    dataset = input_pipeline.train_dataset(
        demo_source,
        global_batch_size=16,
        seed=config.seed,
        examples=input_pipeline.make_examples(config.data),
    )
    last = states[4 * STEPS_PER_EPOCH].ssps
    epoch = 3
    batches = [dataset[epoch * STEPS_PER_EPOCH + s]["index"] for s in range(STEPS_PER_EPOCH)]
    # Reference queue: one epoch, the batch of step s at positions [16 s, 16 s + 16).
    ref = last.ref_index.reshape(-1)
    for s, indices in enumerate(batches):
        np.testing.assert_array_equal(ref[16 * s : 16 * (s + 1)], indices)
    # Positive queue (96 rows): position (16 s) mod 96; the latest write wins.
    pos = last.pos_index.reshape(-1)
    for s in range(STEPS_PER_EPOCH - 6, STEPS_PER_EPOCH):
        start = (16 * s) % 96
        np.testing.assert_array_equal(pos[start : start + 16], batches[s])
    # The stored y^ are unit vectors, and the stored positives are not (they are raw z2).
    np.testing.assert_allclose(np.linalg.norm(last.ref_emb.reshape(-1, 16), axis=1), 1.0, rtol=1e-5)


def test_schedule_fill_then_cluster_then_sample(uninterrupted):
    _, workdir, states, _ = uninterrupted
    # Plain SimCLR in epoch 0: queues untouched.
    assert np.all(states[STEPS_PER_EPOCH].ssps.ref_index == -1)
    # Queues fill during epoch 1 (start_epoch - 1); nothing is replaced before epoch 2.
    assert np.all(states[2 * STEPS_PER_EPOCH].ssps.ref_index >= 0)
    assert int(states[2 * STEPS_PER_EPOCH].ssps.clustered_epoch) == -1
    train = _records(workdir, "train")
    assert "ssps/coverage" not in train[0]
    assert all(r["ssps/coverage"] == 0 for r in train if STEPS_PER_EPOCH < r["step"] <= 2 * STEPS_PER_EPOCH)
    assert all(r["ssps/coverage"] > 0 for r in train if r["step"] > 2 * STEPS_PER_EPOCH)
    # Clustering at the start of epochs 2 and 3, logged with its diagnostics.
    clustering = _records(workdir, "ssps")
    assert [r["step"] for r in clustering] == [2 * STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH]
    assert all(0 <= r["nmi_speaker"] <= 1 and 0 <= r["nmi_session"] <= 1 for r in clustering)
    assert int(states[4 * STEPS_PER_EPOCH].ssps.clustered_epoch) == 3


def test_each_program_compiles_once(uninterrupted):
    *_, compiles = uninterrupted
    steps = [c for c in compiles if "simclr_step" in c]
    clusters = [c for c in compiles if "_cluster" in c]
    assert len(steps) == 2, steps  # one program without the queues, one with
    assert len(clusters) == 1, clusters  # epochs 2 and 3 reuse it


def test_resume_in_the_ssps_phase_reproduces_the_losses(demo_dir, tmp_path, uninterrupted):
    _, reference_dir, _, _ = uninterrupted
    reference = {r["step"]: r["loss"] for r in _records(reference_dir, "train")}
    config = ssps_config(demo_dir)
    workdir = tmp_path / "resumed"

    def kill_at(step):
        def hook(done, state):
            if done == step:
                raise Interrupted

        return hook

    # Mid-SSPS epoch 2 (resumes from step 32 with its clustering restored), then just
    # after the end of epoch 2 (resumes from 45 and clusters again for epoch 3).
    for kill in (35, 46):
        with pytest.raises(Interrupted):
            train_lib.train(config, workdir, on_step=kill_at(kill))
    train_lib.train(config, workdir)
    resumed = {r["step"]: r["loss"] for r in _records(workdir, "train")}
    assert sorted(resumed) == sorted(reference)
    np.testing.assert_allclose([resumed[s] for s in reference], list(reference.values()), rtol=1e-6)


def test_continuing_with_other_ssps_sizes_clusters_again(demo_dir, tmp_path, uninterrupted, caplog):
    """A finished SSPS run continued with another K: queues restored, clustering redone (no shape error)."""
    _, reference_dir, states, _ = uninterrupted
    workdir = tmp_path / "continued"
    shutil.copytree(reference_dir, workdir)
    config = ssps_config(demo_dir)
    config.ssps.kmeans_clusters = 12
    config.train.epochs = 5
    seen = {}
    with caplog.at_level(logging.WARNING, logger="ssps_jax.checkpoint"):
        train_lib.train(config, workdir, on_step=lambda done, state: seen.setdefault(done, jax.device_get(state.ssps)))
    assert "assignment/centroids/neighbours/clustered_epoch saved with other sizes" in caplog.text
    first = seen[4 * STEPS_PER_EPOCH + 1]
    np.testing.assert_array_equal(first.ref_index[1:], states[4 * STEPS_PER_EPOCH].ssps.ref_index[1:])  # kept
    assert first.centroids.shape == (12, 16) and int(first.clustered_epoch) == 4  # clustered anew
    assert _records(workdir, "ssps")[-1]["step"] == 4 * STEPS_PER_EPOCH


def test_kill_during_the_epoch_start_kmeans_resumes_exactly(demo_dir, tmp_path, uninterrupted):
    from test_checkpoint_faults import _driver, _kill_when_marked

    _, reference_dir, _, _ = uninterrupted
    reference = {r["step"]: r["loss"] for r in _records(reference_dir, "train")}
    config = ssps_config(demo_dir)
    workdir = tmp_path / "w"
    _kill_when_marked(_driver(config, workdir, "kill-in-kmeans", str(START)), workdir)
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())[-1] == START * STEPS_PER_EPOCH

    train_lib.train(config, workdir)
    resumed = {r["step"]: r["loss"] for r in _records(workdir, "train")}  # the last record of a step logged twice
    assert sorted(resumed) == sorted(reference)
    np.testing.assert_allclose([resumed[s] for s in reference], list(reference.values()), rtol=1e-6)


def test_oracle_sampling_trains_with_same_speaker_other_session_positives(demo_dir, tmp_path):
    """The oracle diagnostic through the real step: no clustering, every pseudo-positive the anchor's speaker
    from another session (the demo corpus's index file has both labels)."""
    config = ssps_config(demo_dir)
    config.ssps.sampling = "oracle"
    config.train.epochs = START + 1
    train_lib.train(config, tmp_path)
    sampled = [r for r in _records(tmp_path, "train") if r["step"] > START * STEPS_PER_EPOCH]
    assert sampled and not _records(tmp_path, "ssps")  # steps that sampled; no epoch-start clustering
    assert all(r["ssps/same_speaker"] == 1.0 and r["ssps/same_session"] == 0.0 for r in sampled)
    assert np.mean([r["ssps/coverage"] for r in sampled]) > 0.2
