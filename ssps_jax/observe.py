"""What a run shows while it runs: a progress line, TensorBoard scalars, metrics.jsonl.

Only process 0 writes. The progress line is printed every `log_every_steps`
(plain lines rather than a redrawn bar, so logs of batch jobs stay readable):

  step 1200/25000  epoch 4/100  loss 3.2110  lr 1.0e-03  | 212.4 samples/s  0.83 steps/s  ETA 7h58m
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
from tensorboardX import SummaryWriter

from data_pipelines.staging import duration  # one format for every ETA (data_pipelines has no JAX)
from ssps_jax import storage


class MetricWriter:
    """Scalars to TensorBoard (<workdir>/tensorboard) and to <workdir>/metrics.jsonl."""

    def __init__(self, workdir: str | Path):
        self.active = jax.process_index() == 0
        if self.active:
            workdir = Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(str(workdir / "tensorboard"))
            self._jsonl = (workdir / "metrics.jsonl").open("a")

    def write(self, step: int, scalars: dict[str, float], kind: str = "train") -> None:
        if not self.active:
            return
        with storage.writing(self._jsonl.name, "metrics"):
            for key, value in scalars.items():
                self._tb.add_scalar(f"{kind}/{key}", value, step)
            self._jsonl.write(json.dumps({"kind": kind, "step": step, **scalars}) + "\n")
            self._jsonl.flush()

    def close(self) -> None:
        if self.active:
            with storage.writing(self._jsonl.name, "metrics"):
                self._tb.close()
                self._jsonl.close()


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
