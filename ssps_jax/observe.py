"""What a run shows while it runs: a progress line, TensorBoard scalars, metrics.jsonl.

Only process 0 writes. The progress line is printed every `log_every_steps`
(plain lines rather than a redrawn bar, so logs of batch jobs stay readable):

  step 1200/25000  epoch 4/100  loss 3.2110  lr 1.0e-03  | 212.4 samples/s  0.83 steps/s  ETA 7h58m

and, when the run ends, a summary (`Progress.summary`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable

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
    """steps/s, samples/s and ETA of a training process, for its progress lines and its end-of-run summary.

    A step counts as done when the loop has fetched its metrics (`finished`), i.e. when the devices have
    finished it. A line's rates cover the steps done since the previous line; the first line's, the steps
    after this process's first one, so that compiling it is not counted (a first line that has only that
    step counts it, compilation included: there is nothing else to measure). Time spent `paused()`
    (evaluations) is left out. The ETA divides the steps left by this process's own rate since its first
    step: the steps a resumed run restored, and the time before it started, are not counted. `clock`
    (seconds, monotonic) is injectable for tests.
    """

    def __init__(
        self,
        total_steps: int,
        steps_per_epoch: int,
        global_batch: int,
        start_step: int,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.total, self.per_epoch, self.batch, self.start = total_steps, steps_per_epoch, global_batch, start_step
        self._clock = clock
        self._began = clock()
        self._paused = 0.0
        self._first: tuple[int, float] | None = None  # (step, running seconds) of this process's first step
        self._latest = (start_step, 0.0)  # the last step done
        self._mark = (start_step, 0.0)  # where the previous line was

    def _running(self) -> float:
        """Seconds since this process's loop began, less the paused ones."""
        return self._clock() - self._began - self._paused

    @contextlib.contextmanager
    def paused(self):
        """Time spent in this block is not training time (rates and ETA leave it out)."""
        started = self._clock()
        try:
            yield
        finally:
            self._paused += self._clock() - started

    def finished(self, step: int) -> None:
        """`step` steps are done (the devices finished the last one: its metrics were fetched)."""
        self._latest = (step, self._running())
        if self._first is None:
            self._first = self._latest

    def rates(self) -> dict[str, float]:
        """steps/s and samples/s over the steps done since the previous call (the previous line)."""
        (step, now), (mark_step, mark_time) = self._latest, self._mark
        if mark_step == self.start and self._first is not None and self._first[0] < step:
            mark_step, mark_time = self._first  # the first line: from the end of the (compiled) first step
        self._mark = self._latest
        return self._per_second(step - mark_step, now - mark_time)

    def overall(self) -> dict[str, float]:
        """This process's rates over its steps after its first (all of them if it ran only one)."""
        step, now = self._latest
        first_step, first_time = self._first if self._first and self._first[0] < step else (self.start, 0.0)
        return self._per_second(step - first_step, now - first_time)

    def _per_second(self, steps: int, seconds: float) -> dict[str, float]:
        steps_per_s = steps / seconds if steps > 0 and seconds > 0 else math.nan
        return {"steps_per_s": steps_per_s, "samples_per_s": steps_per_s * self.batch}

    def eta(self) -> float:
        """Seconds until `total_steps`, at this process's rate (NaN before it has one)."""
        return (self.total - self._latest[0]) / self.overall()["steps_per_s"]

    def line(self, step: int, scalars: dict[str, float]) -> str:
        return (
            f"step {step}/{self.total}  epoch {(step - 1) // self.per_epoch + 1}/{self.total // self.per_epoch}  "
            f"loss {scalars['loss']:.4f}  lr {scalars['lr']:.1e}  | {scalars['samples_per_s']:.1f} samples/s  "
            f"{scalars['steps_per_s']:.2f} steps/s  ETA {_duration(self.eta())}"
        )

    def summary(self) -> str:
        """The end-of-run line: steps this process ran, their time, its samples/s and steps/s."""
        step, running = self._latest
        rates = self.overall()
        evaluating = f" (+{_duration(self._paused)} evaluating)" if self._paused else ""
        return (
            f"trained steps {self.start + 1}-{step} of {self.total} in {_duration(running)}{evaluating}: "
            f"{rates['samples_per_s']:.1f} samples/s, {rates['steps_per_s']:.2f} steps/s after the first step"
        )


def _duration(seconds: float) -> str:
    return duration(seconds) if math.isfinite(seconds) else "?"


def say(message: str) -> None:
    """Prints on process 0 only."""
    if jax.process_index() == 0:
        print(message, file=sys.stdout, flush=True)
