"""The training loop: exact resume, non-finite losses, config errors, evaluation."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_config

from ssps_jax import config as config_lib
from ssps_jax import train as train_lib
from ssps_jax.evaluate import evaluate


class Interrupted(Exception):
    pass


def _losses(workdir):
    """Per-step training loss; a step logged twice (before and after a resume) keeps the last."""
    losses = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            losses[record["step"]] = record["loss"]
    return losses


@pytest.fixture(scope="module")
def uninterrupted(demo_dir, tmp_path_factory):
    """A complete 2-epoch run, evaluated at its end."""
    config = tiny_config(demo_dir)
    config.eval.every_epochs = 2
    workdir = tmp_path_factory.mktemp("uninterrupted")
    results = train_lib.train(config, workdir)
    return config, workdir, results


def test_killed_run_resumes_with_identical_losses(demo_dir, tmp_path, uninterrupted):
    config, reference_dir, _ = uninterrupted
    reference = _losses(reference_dir)
    steps_per_epoch = 240 // 16
    assert sorted(reference) == list(range(1, 2 * steps_per_epoch + 1))
    # It learns: the second epoch's mean loss is below the first's (one step's loss is one batch's, too noisy).
    losses = np.array([reference[s] for s in sorted(reference)]).reshape(2, steps_per_epoch)
    assert losses[1].mean() < losses[0].mean(), losses.mean(axis=1)
    events = list((reference_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 1000  # TensorBoard scalars written

    def kill_at(step):
        def hook(done, state):
            if done == step:
                raise Interrupted

        return hook

    workdir = tmp_path / "run"
    config.eval.every_epochs = 0
    # Killed mid-epoch 1 (checkpoints every 8 steps: resumes from step 8), then again
    # just after the epoch-1 checkpoint (resumes from 15 with a fresh input iterator).
    for kill in (10, 16):
        with pytest.raises(Interrupted):
            train_lib.train(config, workdir, on_step=kill_at(kill))
    train_lib.train(config, workdir)
    resumed = _losses(workdir)
    assert sorted(resumed) == sorted(reference)
    np.testing.assert_allclose(
        [resumed[s] for s in sorted(reference)], [reference[s] for s in sorted(reference)], rtol=1e-6
    )


def test_device_augmentation_trains_as_the_host_path_and_logs_input_waits(tmp_path, uninterrupted, capsys):
    """data.augment.on=device: the same draws, augmented in the step, give the host path's losses; every logged
    line carries the input-wait share and the devices' step time."""
    config, reference_dir, _ = uninterrupted
    reference = _losses(reference_dir)
    config = config.copy_and_resolve_references()
    config.data.augment.on = "device"
    config.eval.every_epochs = 0

    def stop(done, state):
        if done == 4:
            raise Interrupted

    workdir = tmp_path / "device"
    with pytest.raises(Interrupted):
        train_lib.train(config, workdir, on_step=stop)
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]  # step 4's metrics are fetched one step late
    np.testing.assert_allclose([r["loss"] for r in train], [reference[s] for s in (1, 2, 3)], rtol=1e-4)
    assert all(0 <= r["input_wait_share"] < 1 and r["device_step_s"] > 0 for r in train)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 3 and all("| input wait " in line and " ms/step" in line for line in lines)


def test_input_wait_share_and_its_one_warning():
    from ssps_jax.input_wait import InputWait

    now = [0.0]

    def batches(wait):
        while True:
            now[0] += wait  # the loop blocks this long in next(iterator)
            yield {}

    waits = InputWait(0.2, "raise data.workers (now 2)", clock=lambda: now[0])
    it = batches(0.5)
    waits.next(it)  # the first batch: worker start-up, not counted
    for _ in range(4):
        now[0] += 1.5  # the step's own time on the host
        waits.next(it)
    first = waits.scalars()
    assert first == {"input_wait_share": pytest.approx(2.0 / 8.0)}  # 4 waits of 0.5 s in 8 s
    message = waits.warning(first)
    assert "25% of the last logging window" in message and "raise data.workers (now 2)" in message
    waits.next(it)
    assert waits.scalars()["input_wait_share"] == 1.0  # nothing but waiting since the last log
    assert waits.warning({"input_wait_share": 0.9}) is None  # said once per run
    assert InputWait(0.0, "", clock=lambda: now[0]).warning({"input_wait_share": 0.9}) is None  # 0: never


def test_evaluate_command_reproduces_the_training_evaluation(uninterrupted):
    _, workdir, results = uninterrupted
    assert set(results) == {"demo_trials"}
    again = evaluate(str(workdir))
    assert again["demo_trials"]["cosine"]["eer"] == pytest.approx(results["demo_trials"]["cosine"]["eer"], abs=1e-9)
    assert again["demo_trials"]["cosine"]["min_dcf_0.01"] == pytest.approx(
        results["demo_trials"]["cosine"]["min_dcf_0.01"], abs=1e-9
    )
    out = workdir / "eval" / "step_30"
    written = json.loads((out / "metrics.json").read_text())
    assert written["results"]["demo_trials"]["trials"] == results["demo_trials"]["trials"]
    scores = (out / "demo_trials.scores.txt").read_text().splitlines()
    assert len(scores) == results["demo_trials"]["trials"]
    assert all(-1.0 - 1e-6 <= float(line.split()[0]) <= 1.0 + 1e-6 for line in scores)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(demo_dir, tmp_path):
    config = tiny_config(demo_dir)
    config.optim.optimizer = "sgd"
    config.optim.learning_rate = 1e30  # diverges within a few steps
    workdir = tmp_path / "nan"
    with pytest.raises(train_lib.NonFiniteLossError, match=r"loss is (nan|inf|-inf) at step (\d+)") as e:
        train_lib.train(config, workdir)
    bad_step = int(e.value.args[0].split(" at step ")[1].split()[0])
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert all(s < bad_step for s in saved)
    assert f"last good checkpoint is step {saved[-1] if saved else None}" in str(e.value)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("model.encoder", "transformer", "config.model.encoder: must be one of"),
        ("train.global_batch_size", 12, "config.train.global_batch_size: 12 is not divisible by the 8 devices"),
        ("train.epochs", 0, "config.train.epochs: must be >= 1"),
        ("optim.schedule", "linear", "config.optim.schedule: must be one of"),
        ("data.train_csv", "/nowhere.csv", "config.data.train_csv: file not found"),
        ("model.ecapa_tdnn.dilations", (1, 2), "config.model.ecapa_tdnn.dilations: needs 3 entries"),
        ("data.augment.strategy", "chorus", "config.data: augment strategy must be one of"),
        ("data.augment.on", "gpu", "config.data.augment.on: must be one of"),
        ("train.input_wait_warning", 1.5, r"config.train.input_wait_warning: must be in \[0, 1\)"),
        ("eval.trials", ("/nowhere.txt",), r"config.eval.trials\[0\]: file not found"),
    ],
)
def test_invalid_config_fails_before_compiling(demo_dir, tmp_path, monkeypatch, key, value, message):
    config = tiny_config(demo_dir)
    *parents, field = key.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[field] = value
    compiled = []
    monkeypatch.setattr(train_lib, "build", lambda *a, **k: compiled.append(1))
    with pytest.raises(config_lib.ConfigError, match=message):
        train_lib.train(config, tmp_path / "w")
    assert not compiled


def test_what_needs_the_data_is_checked_before_the_workdir_is_written(demo_dir, tmp_path, capsys):
    """k-means clusters beyond the reference queue (one epoch of the prepared split) are refused before
    config.json is touched; a setting that cannot take effect is a one-line warning first."""
    config = tiny_config(demo_dir)
    config.ssps.enabled = True
    config.ssps.start_epoch = 1
    config.ssps.pos_queue_size = 32
    config.ssps.kmeans_clusters = 241  # the reference queue holds 15 steps x 16 = 240 rows
    config.optim.lr_scale = 0.5  # without optim.lr_scale_from_epoch: never applies
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "config.json").write_text("the earlier run's\n")
    with pytest.raises(
        config_lib.ConfigError, match=r"config\.ssps\.kmeans_clusters: 241 clusters for a reference queue"
    ):
        train_lib.train(config, workdir)
    assert sorted(p.name for p in workdir.iterdir()) == ["config.json"]
    assert (workdir / "config.json").read_text() == "the earlier run's\n"
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert warnings == ["warning: " + config_lib.ineffective_settings(config)[0]]
    assert warnings[0].startswith("warning: config.optim.lr_scale: 0.5 never applies")


def test_cli_rejects_unknown_config_keys(tmp_path):
    """The real command, as multi-host jobs launch it: one line naming the closest key, exit 2, nothing written."""
    from pathlib import Path

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ssps_jax.cli",
            "train",
            "--config",
            "configs/demo_simclr.py",
            "--workdir",
            str(tmp_path / "w"),
            "--config.train.epocs=3",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2
    expected = "ssps-jax train: error: config.train.epocs: no such key (did you mean config.train.epochs?)"
    assert result.stderr.splitlines() == [expected]
    assert not (tmp_path / "w").exists()
