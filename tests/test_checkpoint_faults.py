"""Checkpoint faults lose nothing: damaged newest checkpoints, a full disk, kills aimed at the worst moments.

Every case is compared with one uninterrupted run of the same config: the
losses of the faulty run, once resumed, must be those of the uninterrupted
one. The kills are aimed, not random: a driver process patches the moment in
question (orbax renaming a finished checkpoint into place, the evaluation) to
announce itself in a marker file and wait, and the test SIGKILLs it there.
The k-means kill is in tests/test_ssps_train.py, beside its SSPS reference run, with this driver.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from ssps_jax import checkpoint, cli, preemption, sharding
from ssps_jax import train as train_lib
from ssps_jax.build import build_for_inference

STEPS = 15  # one epoch of the small corpus at batch 16


class Interrupted(Exception):
    pass


def fault_config(demo_dir):
    config = tiny_config(demo_dir)
    config.train.epochs = 1
    config.train.checkpoint_every_steps = 3
    config.train.async_checkpoints = True
    return config


def _losses(workdir: Path) -> dict[int, float]:
    """Train losses by step; a step logged twice (before a kill and after the resume) keeps its last value."""
    records = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _assert_same_losses(workdir: Path, reference: dict[int, float]) -> None:
    resumed = _losses(workdir)
    assert sorted(resumed) == sorted(reference)
    np.testing.assert_allclose([resumed[s] for s in reference], list(reference.values()), rtol=1e-6)


@pytest.fixture(scope="module")
def uninterrupted(demo_dir, tmp_path_factory) -> Path:
    """The workdir of the uninterrupted run, with an evaluation at its end (read-only for tests)."""
    config = fault_config(demo_dir)
    config.eval.every_epochs = 1
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train_lib.train(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def reference(uninterrupted):
    """Losses of the uninterrupted run."""
    return _losses(uninterrupted)


def _stop_at(step):
    def hook(done, state):
        if done == step:
            raise Interrupted

    return hook


def _truncate_a_state_file(step_dir: Path) -> None:
    # Orbax's OCDBT store keeps its values in data files under d/ folders: per process, and (with arrays sharded
    # over the devices, such as the optimizer state) the merged store's own.
    largest = max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    os.truncate(largest, 100)


@pytest.mark.parametrize(
    "damage, why",
    [
        (_truncate_a_state_file, r"state/ (value .* )?unreadable \(OUT_OF_RANGE"),
        (lambda d: (d / checkpoint.COMMIT_FILE).unlink(), r"incomplete \(no commit_success.txt\)"),
    ],
    ids=["truncated-data-file", "no-commit-file"],
)
def test_a_damaged_newest_checkpoint_is_skipped_kept_and_training_resumes_exactly(
    demo_dir, tmp_path, reference, caplog, damage, why
):
    config = fault_config(demo_dir)
    config.eval.every_epochs = 1
    workdir = tmp_path / "w"
    with pytest.raises(Interrupted):
        train_lib.train(config, workdir, on_step=_stop_at(11))
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [3, 6, 9]
    damage(workdir / "checkpoints" / "9")

    train_lib.train(config, workdir)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1, skipped
    assert skipped[0].startswith("checkpoint 9 skipped: ")
    assert re.search(why, skipped[0])
    assert skipped[0].endswith(f"moved to {workdir / checkpoint.SKIPPED_DIR / '9'}")
    assert (workdir / checkpoint.SKIPPED_DIR / "9" / "state").is_dir()  # kept, not deleted
    _assert_same_losses(workdir, reference)


def test_no_readable_checkpoint_is_one_line_naming_the_workdir(demo_dir, tmp_path, monkeypatch, capsys):
    config = fault_config(demo_dir)
    workdir = tmp_path / "w"
    with pytest.raises(Interrupted):
        train_lib.train(config, workdir, on_step=_stop_at(4))
    (workdir / "checkpoints" / "3" / checkpoint.COMMIT_FILE).unlink()
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate", "--workdir", str(workdir)])
    message = str(e.value.code)
    assert message == (
        f"error: none of the 1 checkpoint(s) in {workdir.resolve() / 'checkpoints'} can be read back "
        "(steps 3; see the warnings above)"
    )
    # evaluate only reads: the damaged checkpoint stays where it is.
    assert (workdir / "checkpoints" / "3").is_dir() and not (workdir / checkpoint.SKIPPED_DIR).exists()


# A training process whose config is argv[1] (JSON) and workdir argv[2]; argv[3] says where it stops.
DRIVER = textwrap.dedent(
    """
    import json, os, pathlib, resource, signal, sys, time
    import ml_collections

    config_json, workdir, mode, arg = sys.argv[1:5]
    marker = pathlib.Path(workdir + ".marker")

    def wait_here():
        marker.write_text(mode)
        while True:
            time.sleep(1)

    if mode == "kill-in-checkpoint-rename":
        # orbax renames a checkpoint's temporary folder into place once all of it is written.
        rename = os.rename

        def rename_then_wait(src, dst, *a, **k):
            if ".orbax-checkpoint-tmp" in str(src) and os.path.basename(str(dst)) == arg:
                wait_here()
            return rename(src, dst, *a, **k)

        os.rename = rename_then_wait
    if mode == "kill-in-kmeans":
        from ssps_jax.ssps import lifecycle

        before_epoch = lifecycle.SSPS.before_epoch

        def wait_in_clustering(self, queues, epoch, rng):
            clustered = before_epoch(self, queues, epoch, rng)  # dispatched: JAX runs it while we wait
            if epoch == int(arg):
                wait_here()
            return clustered

        lifecycle.SSPS.before_epoch = wait_in_clustering
    if mode == "kill-in-evaluation":
        from ssps_jax.evaluation import verification

        verification.TrialEvaluator.evaluate = lambda self, *a, **k: wait_here()

    from ssps_jax import cli, train

    def on_step(done, state):
        if mode == "disk-full" and done == int(arg):
            time.sleep(2)  # let the async save of the previous checkpoint finish
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    run = train.train
    train.train = lambda config, workdir: run(config, workdir, on_step=on_step)
    pathlib.Path(workdir + ".py").write_text(
        "import json, ml_collections\\n"
        f"def get_config():\\n    return ml_collections.ConfigDict(json.loads({open(config_json).read()!r}))\\n"
    )
    cli.main(["train", "--config", workdir + ".py", "--workdir", workdir])
    """
)


def _driver(config, workdir: Path, mode: str, arg: str = "") -> subprocess.Popen:
    config_json = workdir.parent / f"{workdir.name}.json"
    config_json.write_text(config.to_json())
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    argv = [sys.executable, "-c", DRIVER, str(config_json), str(workdir), mode, arg]
    # Output through a pipe: a file-size limit (the disk-full case) does not apply to pipes.
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_when_marked(process: subprocess.Popen, workdir: Path, timeout: float = 300) -> None:
    marker = Path(f"{workdir}.marker")
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"the driver ended before the aimed moment:\n{process.stdout.read()}")
        assert time.monotonic() < deadline, "the aimed moment never came"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def test_kill_while_a_checkpoint_is_renamed_into_place_resumes_exactly(demo_dir, tmp_path, reference):
    config = fault_config(demo_dir)
    config.eval.every_epochs = 1
    workdir = tmp_path / "w"
    _kill_when_marked(_driver(config, workdir, "kill-in-checkpoint-rename", "9"), workdir)
    assert not (workdir / "checkpoints" / "9").exists()  # written, never committed

    train_lib.train(config, workdir)
    _assert_same_losses(workdir, reference)
    assert not list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))  # the partial save is cleaned up


def test_kill_during_evaluation_resumes_and_evaluates_again(demo_dir, tmp_path, reference):
    config = fault_config(demo_dir)
    config.eval.every_epochs = 1
    workdir = tmp_path / "w"
    _kill_when_marked(_driver(config, workdir, "kill-in-evaluation"), workdir)
    assert (workdir / "checkpoints" / str(STEPS)).is_dir()  # the epoch's checkpoint came before its evaluation
    assert not (workdir / "eval" / f"step_{STEPS}").exists()

    train_lib.train(config, workdir)
    _assert_same_losses(workdir, reference)
    assert (workdir / "eval" / f"step_{STEPS}" / "metrics.json").is_file()  # the evaluation the kill cut short


def test_a_full_disk_stops_with_one_line_and_a_rerun_resumes_exactly(demo_dir, tmp_path, reference):
    config = fault_config(demo_dir)
    config.eval.every_epochs = 1
    workdir = tmp_path / "w"
    process = _driver(config, workdir, "disk-full", "7")  # checkpoints 3 and 6 written; 9 hits the limit
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 1, output
    lines = [line for line in output.splitlines() if not line.startswith("step ")]
    assert lines[-1] == (
        f"error: writing checkpoint 9 to {workdir.resolve()}/checkpoints/9: File too large. Nothing written "
        "before is lost: free space and run the same command again to resume from the newest checkpoint"
    )
    assert "Traceback" not in output and "Event loop is closed" not in output, output
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]

    train_lib.train(config, workdir)
    _assert_same_losses(workdir, reference)


def _tree_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> SHA-256 of its bytes), and every folder (-> "dir")."""
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def _config_file(config, path: Path) -> Path:
    path.write_text(
        "import json, ml_collections\n"
        f"def get_config():\n    return ml_collections.ConfigDict(json.loads({config.to_json()!r}))\n"
    )
    return path


def test_a_checkpoint_of_another_model_is_refused_in_one_line_and_nothing_is_written(
    demo_dir, tmp_path, uninterrupted, capsys
):
    workdir = tmp_path / "w"
    shutil.copytree(uninterrupted, workdir)
    config = fault_config(demo_dir)
    config.eval.every_epochs = 1
    config_py = _config_file(config, tmp_path / "config.py")
    before = _tree_digest(workdir)
    assert f"eval/step_{STEPS}/metrics.json" in before and "config.json" in before

    # Resumed with another encoder: refused before anything is restored or written.
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--config", str(config_py), "--workdir", str(workdir), "--config.model.encoder=resnet34"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(
        f"ssps-jax train: error: checkpoint {STEPS} in {workdir.resolve() / 'checkpoints'} holds another model than "
        "the config builds: params/encoder/"
    )
    assert "(model.encoder probably differs)" in err
    assert _tree_digest(workdir) == before

    # evaluate of a workdir whose config.json is not its checkpoints' (as an older train rewrote it): refused too.
    written = json.loads((workdir / "config.json").read_text())
    written["model"]["ecapa_tdnn"]["se_channels"] = 4
    (workdir / "config.json").write_text(json.dumps(written))
    before = _tree_digest(workdir)
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate", "--workdir", str(workdir)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert re.search(
        r"params/encoder/blocks_1/se_block/conv1/conv/bias is \(8,\) float32 in the checkpoint, \(4,\) float32 in the "
        r"config's model \(model\.ecapa_tdnn\.se_channels probably differs\)",
        err,
    ), err
    assert _tree_digest(workdir) == before

    # The restore itself fails rather than fill arrays the checkpoint does not hold (orbax's structure check on a
    # target that mirrors the checkpoint), or hold with another shape (checked after the read).
    other = config.copy_and_resolve_references()
    other.model.encoder = "resnet34"
    _, _, resnet = build_for_inference(other, sharding.make_mesh())
    other.model.encoder = "ecapa_tdnn"
    other.model.ecapa_tdnn.se_channels = 4
    _, _, narrower = build_for_inference(other, sharding.make_mesh())
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", read_only=True)
    try:
        with pytest.raises(ValueError, match="structures do not match"):
            ckpt.restore(STEPS, resnet)
        with pytest.raises(RuntimeError, match=r"orbax restored ndarray \(8,\)"):
            ckpt.restore(STEPS, narrower)
    finally:
        ckpt.close()
    assert _tree_digest(workdir) == before


def test_sigterm_stops_at_the_step_saves_it_and_the_rerun_resumes_exactly(
    demo_dir, tmp_path, reference, monkeypatch, capsys
):
    """One process: the signal is noticed between steps; a second one while the save runs changes nothing."""
    config = fault_config(demo_dir)
    config.eval.every_epochs = 1
    workdir = tmp_path / "w"
    handlers = {s: signal.getsignal(s) for s in preemption.SIGNALS}
    save, second = checkpoint.Checkpointer.save, []

    def save_then_signal_again(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if step == 5:  # the preemption's save, in flight (asynchronous): Ctrl-C now
            second.append(step)
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_signal_again)

    def preempt(done, state):
        if done == 5:  # between checkpoints 3 and 6
            signal.raise_signal(signal.SIGTERM)

    with pytest.raises(preemption.Preempted) as stopped:
        train_lib.train(config, workdir, on_step=preempt)
    assert stopped.value.step == 5 and stopped.value.status == preemption.PREEMPTED == 75 and second == [5]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [3, 5]
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"stopped for a preemption at step 5: checkpoint 5 is saved in {workdir.resolve() / 'checkpoints'}; run "
        "the same command again to resume from it (exit status 75)"
    )
    assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == handlers  # put back

    monkeypatch.undo()
    train_lib.train(config, workdir)
    assert "resumed from the checkpoint of step 5" in capsys.readouterr().out
    _assert_same_losses(workdir, reference)
