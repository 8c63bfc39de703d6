"""Two JAX processes x 4 CPU devices (jax.distributed, gloo) == one process x 8 devices, SimCLR-SSPS.

The 2-process run is launched twice: first through a driver that SIGKILLs
both processes in the middle of the first SSPS epoch (no clean-up, like a
lost job), then with the real `ssps-jax train` command on the same workdir,
which initialises jax.distributed from JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID and resumes. Every logged loss must equal
the single-process run's.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import tiny_config

from ssps_jax import train as train_lib

STEPS_PER_EPOCH = 240 // 16
KILL_AT = STEPS_PER_EPOCH + 6  # mid-epoch 1, the first SSPS epoch; last checkpoint: step 16


def multihost_config(demo_dir, tfds_dir):
    config = tiny_config(demo_dir)
    config.data.tfds_dir = str(tfds_dir)
    config.ssps.enabled = True
    config.ssps.start_epoch = 1
    config.ssps.kmeans_clusters = 24
    config.ssps.pos_queue_size = 96
    config.data.crops.reference_seconds = 1.0
    config.train.epochs = 2
    config.train.checkpoint_every_steps = 8
    # The two runs reduce in different orders (gloo between processes vs in-process), so they differ by
    # float32 rounding; SimCLR at temperature 0.03 amplifies that over steps, and k-means assignments
    # near a tie would then flip. A small learning rate keeps the two trajectories within rounding.
    config.optim.learning_rate = 1e-5
    return config


def _losses(workdir):
    losses = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            losses[record["step"]] = record["loss"]  # a step logged again after a resume: the last one
    return losses


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(argv, tmp_path, name):
    """Runs `argv` as processes 0 and 1 of a 2-process JAX job with 4 CPU devices each; waits for both."""
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(
            os.environ,
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            JAX_PLATFORMS="cpu",
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
        )
        log = (tmp_path / f"{name}.{pid}.log").open("w")
        procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=600) for p in procs]
    return codes, [(tmp_path / f"{name}.{pid}.log").read_text() for pid in range(2)]


DRIVER = textwrap.dedent(
    """
    import json, os, signal, sys
    import ml_collections
    from ssps_jax import distributed, train

    distributed.initialize()
    config = ml_collections.ConfigDict(json.load(open(sys.argv[1])))

    def kill(done, state):
        if done == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)  # a lost job: no clean-up, no final checkpoint

    train.train(config, sys.argv[2], on_step=kill)
    """
)


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_exactly_after_a_kill(demo_dir, tmp_path):
    config = multihost_config(demo_dir, tmp_path / "tfds")
    # The single-process, 8-device reference, in this pytest process (it also prepares the data).
    train_lib.train(config, tmp_path / "one")
    reference = _losses(tmp_path / "one")
    assert sorted(reference) == list(range(1, 2 * STEPS_PER_EPOCH + 1))

    config_json = tmp_path / "config.json"
    config_json.write_text(config.to_json())
    config_file = tmp_path / "config.py"
    config_file.write_text(
        "import json\nimport ml_collections\n\n\ndef get_config():\n"
        f"    return ml_collections.ConfigDict(json.loads(open({str(config_json)!r}).read()))\n"
    )
    workdir = tmp_path / "two"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    codes, logs = _launch([sys.executable, str(driver), str(config_json), str(workdir), str(KILL_AT)], tmp_path, "a")
    assert codes == [-signal.SIGKILL] * 2, logs
    assert "8 device(s) on 2 process(es)" in logs[0]
    before = _losses(workdir)
    assert max(before) >= STEPS_PER_EPOCH + 2  # it got into the SSPS epoch before dying

    cli = [sys.executable, "-m", "ssps_jax.cli", "train", f"--config={config_file}", f"--workdir={workdir}"]
    codes, logs = _launch(cli, tmp_path, "b")
    assert codes == [0, 0], logs
    assert "resumed from the checkpoint of step 16" in logs[0]
    resumed = _losses(workdir)
    assert sorted(resumed) == sorted(reference)
    np.testing.assert_allclose([before[s] for s in sorted(before)], [reference[s] for s in sorted(before)], rtol=1e-5)
    np.testing.assert_allclose([resumed[s] for s in reference], list(reference.values()), rtol=1e-5)
    # Both processes checkpointed their input position; queues were saved shard by shard.
    step_dir = workdir / "checkpoints" / str(2 * STEPS_PER_EPOCH)
    assert len(list((step_dir / "data").glob("process_*"))) == 2
