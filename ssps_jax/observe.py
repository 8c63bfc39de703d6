"""What a run shows while it runs: a progress line, TensorBoard scalars, metrics.jsonl.

Only process 0 writes. The progress line is printed every `log_every_steps`
(plain lines rather than a redrawn bar, so logs of batch jobs stay readable):

  step 1200/25000  epoch 4/100  loss 3.2110  lr 1.0e-03  | 212.4 samples/s  0.83 steps/s  ETA 7h58m
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import jax
from etils import epath
from tensorboardX import SummaryWriter

from data_pipelines import paths
from data_pipelines.staging import duration  # one format for every ETA (data_pipelines has no JAX)
from ssps_jax import storage

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


class MetricWriter:
    """Scalars to TensorBoard (<workdir>/tensorboard) and to <workdir>/metrics.jsonl.

    A workdir on an object store (gs://) cannot be appended to: its objects are written whole. There
    both files are written in a local folder and copied to the workdir by `sync()`, at most every
    `sync_seconds` when scalars are written, at every checkpoint (train calls it, so that a resumed
    run's metrics.jsonl misses no step) and at `close()`; metrics.jsonl is first copied from the
    workdir, so a resumed run appends to it. tensorboardX's own gs:// writer is not used: it needs
    google-cloud-storage's client beside epath's, and would upload its file at its own moments, not
    with metrics.jsonl at the checkpoints.
    """

    def __init__(self, workdir: epath.PathLike, sync_seconds: float = 60.0):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        self.workdir = epath.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._remote = paths.is_remote(self.workdir)
        self._local = epath.Path(tempfile.mkdtemp(prefix="ssps_jax_metrics_")) if self._remote else self.workdir
        if self._remote and (self.workdir / METRICS).exists():
            (self.workdir / METRICS).copy(self._local / METRICS)
        self._sync_seconds, self._synced = sync_seconds, time.monotonic()
        self._tb = SummaryWriter(os.fspath(self._local / TENSORBOARD))
        self._jsonl = (self._local / METRICS).open("a")

    def write(self, step: int, scalars: dict[str, float], kind: str = "train") -> None:
        if not self.active:
            return
        with storage.writing(self.workdir / METRICS, "metrics"):
            for key, value in scalars.items():
                self._tb.add_scalar(f"{kind}/{key}", value, step)
            self._jsonl.write(json.dumps({"kind": kind, "step": step, **scalars}) + "\n")
            self._jsonl.flush()
        if self._remote and time.monotonic() - self._synced >= self._sync_seconds:
            self.sync()

    def sync(self) -> None:
        """Copies what was written to a remote workdir (nothing to do for a local one)."""
        if not (self.active and self._remote):
            return
        with storage.writing(self.workdir / METRICS, "metrics"):
            self._tb.flush()
            (self._local / METRICS).copy(self.workdir / METRICS, overwrite=True)
            for event_file in (self._local / TENSORBOARD).iterdir():
                event_file.copy(self.workdir / TENSORBOARD / event_file.name, overwrite=True)
        self._synced = time.monotonic()

    def close(self) -> None:
        if self.active:
            with storage.writing(self.workdir / METRICS, "metrics"):
                self._tb.close()
                self._jsonl.close()
            if self._remote:
                self.sync()
                self._local.rmtree()


class Progress:
    """Throughput and ETA over the last logging window."""

    def __init__(self, total_steps: int, steps_per_epoch: int, global_batch: int, start_step: int, window: int):
        self.total, self.per_epoch, self.batch, self.window = total_steps, steps_per_epoch, global_batch, window
        self._t, self._step = time.perf_counter(), start_step
        self._rates = {"steps_per_s": 0.0, "samples_per_s": 0.0}

    def rates(self, step: int) -> dict[str, float]:
        """steps/s and samples/s since the previous window of `window` steps; `step` = steps done.

        A shorter window (the run's last steps) reports the previous window's rates.
        """
        if step - self._step >= self.window:
            now = time.perf_counter()
            steps_per_s = (step - self._step) / max(now - self._t, 1e-9)
            self._t, self._step = now, step
            self._rates = {"steps_per_s": steps_per_s, "samples_per_s": steps_per_s * self.batch}
        return dict(self._rates)

    def line(self, step: int, scalars: dict[str, float]) -> str:
        eta = (self.total - step) / max(scalars["steps_per_s"], 1e-9)
        return (
            f"step {step}/{self.total}  epoch {(step - 1) // self.per_epoch + 1}/{self.total // self.per_epoch}  "
            f"loss {scalars['loss']:.4f}  lr {scalars['lr']:.1e}  | {scalars['samples_per_s']:.1f} samples/s  "
            f"{scalars['steps_per_s']:.2f} steps/s  ETA {duration(eta)}"
        )


def say(message: str) -> None:
    """Prints on process 0 only."""
    if jax.process_index() == 0:
        print(message, file=sys.stdout, flush=True)
