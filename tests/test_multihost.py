"""A pod run on one machine: two JAX processes x 4 CPU devices (jax.distributed, gloo), everything on gs://.

One test tells the whole story, against a real GCS JSON API (gcp-storage-emulator, tests/gcs.py), with
SimCLR-SSPS (k-means, sharded queues):
  * the small corpus's CSVs, trial list, test audio, noise and RIR folders are copied to gs://bucket/data
    (and read back alike), and `ssps-jax prepare` writes its records to gs://bucket/tfds;
  * the 2-process run is started with the command block of docs/pods.md, as written, workdir gs://bucket/run:
    1. SIGTERM to process 1 only, mid-epoch: both processes stop at one step S, checkpointed with both
       input positions, exit 75, and process 0 prints the one line;
    2. the same command resumes from S; both processes are then SIGKILLed (a lost job, no clean-up);
    3. the same command resumes from the last periodic checkpoint and finishes;
    every logged loss (metrics.jsonl on gs://) equals the single-process, 8-device run's;
  * evaluate, extract and export write their outputs to gs://.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from etils import epath

from data_pipelines import audio_io
from data_pipelines import augment as augment_lib
from data_pipelines.demo_corpus import corpus
from data_pipelines.manifests import read_trials
from ssps_jax import cli
from ssps_jax import extract as extract_lib
from ssps_jax import train as train_lib

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 240 // 16
STEPS = 2 * STEPS_PER_EPOCH
PREEMPT_AFTER = STEPS_PER_EPOCH + 2  # process 1 gets SIGTERM once process 0 has logged this step (first SSPS epoch)


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


def _losses(workdir) -> dict[int, float]:
    losses = {}
    for line in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            losses[record["step"]] = record["loss"]  # a step logged again after a resume: the last one
    return losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def pods_block() -> str:
    """The command block of docs/pods.md that starts two processes on one machine."""
    text = (ROOT / "docs" / "pods.md").read_text()
    return re.search(r"<!-- tests/test_multihost.py runs this block -->\n```bash\n(.*?)```", text, re.S).group(1)


def _processes(parent: int) -> dict[int, int]:
    """JAX_PROCESS_ID -> pid of the processes `parent` (the shell running the block) started."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        for entry in environ:
            if entry.startswith(b"JAX_PROCESS_ID="):
                found[int(entry.split(b"=")[1])] = int(stat.parent.name)
    return found


class Launch:
    """docs/pods.md's block run by bash in `folder`: two `ssps-jax train` processes, their logs train.<id>.log."""

    def __init__(self, folder: Path, config_py: Path, workdir: str):
        for pid in (0, 1):
            (folder / f"train.{pid}.log").unlink(missing_ok=True)
        self.folder = folder
        # No shared compilation cache (conftest passes the run's to subprocesses through JAX_* variables): a
        # process that finds its programs there while its partner compiles reaches the first collective minutes
        # early, and gloo gives up after 30 s (DEADLINE_EXCEEDED).
        cache = ("JAX_COMPILATION_CACHE", "JAX_PERSISTENT")
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(cache)}
        env = dict(
            inherited,
            CONFIG=str(config_py),
            WORKDIR=workdir,
            PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            SSPS_JAX_CACHE=str(folder / "hosts"),  # the hosts' local copies of the records, made by both at once
        )
        block = pods_block().replace("localhost:8476", f"localhost:{_free_port()}")
        self.shell = subprocess.Popen(
            ["bash", "-c", block], cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def log(self, pid: int) -> str:
        path = self.folder / f"train.{pid}.log"
        return path.read_text() if path.exists() else ""

    def wait_for_step(self, step: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        failed = None
        while not re.search(rf"^step {step}/", self.log(0), re.M):
            logs = f"{self.log(0)}\n{self.log(1)}"
            if "Traceback" in logs:  # a process failed: its partner may wait for it forever; its error first
                failed = failed or time.monotonic()
            ended = self.shell.poll() is not None or (failed and time.monotonic() - failed > 30)
            assert not ended and time.monotonic() < deadline, f"no step {step}:\n{logs}"
            time.sleep(0.2)

    def signal(self, signum: int, ids=(0, 1)) -> None:
        pids = _processes(self.shell.pid)
        for i in ids:
            os.kill(pids[i], signum)

    def statuses(self) -> list[int]:
        """The exit status of each process, as the block prints them."""
        output, _ = self.shell.communicate(timeout=600)
        return [int(s) for s in re.findall(r"^exit status (\d+)$", output, re.M)]

    def __enter__(self) -> "Launch":
        return self

    def __exit__(self, *exc) -> None:
        """Nothing left running, whatever happened."""
        if self.shell.poll() is None:
            for pid in _processes(self.shell.pid).values():
                os.kill(pid, signal.SIGKILL)
            self.shell.kill()
            self.shell.wait()


@pytest.mark.slow
def test_a_two_process_run_on_gs_stops_for_a_preemption_survives_a_kill_and_equals_one_process(
    demo_dir, tmp_path, gcs_bucket, monkeypatch
):
    # The single-process, 8-device reference, in this pytest process, on local disk.
    reference_config = multihost_config(demo_dir, tmp_path / "tfds")
    train_lib.train(reference_config, tmp_path / "one")
    reference = _losses(tmp_path / "one")
    assert sorted(reference) == list(range(1, STEPS + 1))

    # The corpus on gs:// (its CSVs, trial list, the test audio, the noise and RIR folders), its records prepared
    # there. Training's augmentation reads the local noise and RIR folders: one gs:// read per crop would make the
    # test minutes longer; reading them from gs:// is checked below to give the same augmented audio.
    data = epath.Path(gcs_bucket) / "data"
    tested = {f for t in read_trials(demo_dir / corpus.TRIALS) for f in (t.enrol, t.test)}
    for file in sorted(p for p in Path(demo_dir).rglob("*") if p.is_file()):
        relative = file.relative_to(demo_dir).as_posix()
        listed = file.parent == demo_dir and file.suffix in (".csv", ".txt")
        if listed or relative in tested or relative.startswith(("musan_split/", "simulated_rirs/")):
            epath.Path(file).copy(data / relative)
    monkeypatch.setenv("SSPS_JAX_CACHE", str(tmp_path / "cache"))  # where `prepare` writes the records first
    cli.main(["prepare", "--csv", str(demo_dir / corpus.TRAIN_CSV), "--base-dir", str(demo_dir), "--data-dir",
              f"{gcs_bucket}/tfds", "--workers", "1"])  # fmt: skip
    assert (epath.Path(gcs_bucket) / "tfds" / f"{Path(corpus.TRAIN_CSV).stem}.index.csv").is_file()
    some = sorted(tested)[0]
    assert np.array_equal(audio_io.read_audio(data / some).samples, audio_io.read_audio(demo_dir / some).samples)
    augment = [
        augment_lib.Augmenter(augment_lib.AugmentConfig(), base / "musan_split", base / "simulated_rirs")
        for base in (data, epath.Path(demo_dir))
    ]
    wave = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    on_gs, local = (a(wave, np.random.default_rng(1)) for a in augment)
    assert np.array_equal(on_gs, local) and not np.array_equal(local, wave)

    config = multihost_config(data, f"{gcs_bucket}/tfds")
    config.data.base_dir = str(data)
    config.data.train_csv = f"{data}/{corpus.TRAIN_CSV}"
    config.data.augment.noise_dir = str(demo_dir / "musan_split")
    config.data.augment.rir_dir = str(demo_dir / "simulated_rirs")
    config.eval.trials = (f"{data}/{corpus.TRIALS}",)
    config_py = tmp_path / "config.py"
    config_py.write_text(
        "import json, ml_collections\n"
        f"def get_config():\n    return ml_collections.ConfigDict(json.loads({config.to_json()!r}))\n"
    )
    workdir = f"{gcs_bucket}/run"
    checkpoints = epath.Path(workdir) / "checkpoints"

    # 1. A preemption notice to process 1 only: both stop at one step, saved, and exit 75.
    with Launch(tmp_path, config_py, workdir) as launch:
        launch.wait_for_step(PREEMPT_AFTER)
        launch.signal(signal.SIGTERM, ids=(1,))
        assert launch.statuses() == [75, 75], launch.log(0) + launch.log(1)
    assert "8 device(s) on 2 process(es)" in launch.log(0)
    stopped = re.findall(
        r"^stopped for a preemption at step (\d+): checkpoint \1 is saved in (\S+); ", launch.log(0), re.M
    )
    assert len(stopped) == 1 and stopped[0][1] == f"{checkpoints}", launch.log(0)
    saved = int(stopped[0][0])
    assert PREEMPT_AFTER < saved < 24 and saved % 8  # not a periodic checkpoint: the preemption's
    assert max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == saved
    positions = sorted(p.name for p in (checkpoints / str(saved) / "data").iterdir() if p.name.startswith("process"))
    assert positions == ["process_0-of-2.json", "process_1-of-2.json"]  # both processes saved theirs at that step
    assert "stopped for a preemption" not in launch.log(1)  # one line, from process 0

    # 2. The same command resumes; then both processes are lost without clean-up, after the next checkpoint.
    periodic = (saved // 8 + 1) * 8
    with Launch(tmp_path, config_py, workdir) as launch:
        launch.wait_for_step(periodic + 2)  # synchronous checkpoints: `periodic` is committed
        launch.signal(signal.SIGKILL)
        assert launch.statuses() == [128 + signal.SIGKILL] * 2
    assert f"resumed from the checkpoint of step {saved} in {workdir}" in launch.log(0)

    # 3. And again: it resumes from the last periodic checkpoint and finishes with the one-process run's losses.
    with Launch(tmp_path, config_py, workdir) as launch:
        assert launch.statuses() == [0, 0], launch.log(0) + launch.log(1)
    assert f"resumed from the checkpoint of step {periodic} in {workdir}" in launch.log(0)
    resumed = _losses(workdir)
    assert sorted(resumed) == sorted(reference)
    np.testing.assert_allclose([resumed[s] for s in reference], list(reference.values()), rtol=1e-5)

    # evaluate, extract and export (StableHLO), on gs:// too, here with one process of 8 devices.
    cli.main(["evaluate", "--workdir", workdir])
    metrics = json.loads((epath.Path(workdir) / "eval" / f"step_{STEPS}" / "metrics.json").read_text())
    assert metrics["step"] == STEPS and 0 <= metrics["results"][Path(corpus.TRIALS).stem]["cosine"]["eer"] <= 100
    out = epath.Path(gcs_bucket) / "out"
    cli.main(["extract", "--workdir", workdir, "--trials", config.eval.trials[0], "--out", f"{out}/emb.npz"])
    with (out / "emb.npz").open("rb") as f:
        embeddings = np.load(f)["embeddings"]
    files = extract_lib.read_file_list(config.eval.trials[0], trials=True)
    assert embeddings.shape == (len(files), 16) and np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    assert not (out / "emb.npz.parts").exists()
    cli.main(["export", "--workdir", workdir, "--format", "stablehlo", "--out", f"{out}/model.stablehlo"])
    assert json.loads((out / "model.stablehlo.json").read_text())["step"] == STEPS
