"""Where a run's wall time goes: blocked on the input pipeline, or on the devices.

The training loop takes every batch through `InputWait.next`, a timed
`next(iterator)`; at each logged step it also calls `time_step`, which waits
for the previous step's outputs, then for this step's: the interval is the
devices' time for this step alone (it starts when the previous one ends, or at
once if the devices were idle). That wait costs the pipeline one bubble per
logging window (the devices idle while the host fetches the next batch), a
few milliseconds in `train.log_every_steps` steps.

`scalars()` closes a logging window and gives its figures, which the loop
adds to the logged metrics (progress line, TensorBoard, metrics.jsonl):

  input_wait_share  seconds blocked in next(iterator) / wall seconds of the window
  device_step_s     the devices' time of the logged step

so samples/s over batch / device_step_s says how much of what the devices
could take the run gets, and input_wait_share how much of the gap is the
input's. The first batch (worker start-up) is not counted. The first window
whose share exceeds `train.input_wait_warning` prints one warning, naming the
settings to change. Figures are this process's (each process has its own
input pipeline); only process 0 prints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import jax
import ml_collections


class InputWait:
    def __init__(self, warn_share: float, advice: str, clock: Callable[[], float] = time.perf_counter):
        self.warn_share, self.advice, self.clock = warn_share, advice, clock
        self.warned = False
        self._waited, self._since, self._device_step = 0.0, None, math.nan

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> InputWait:
        """The run's threshold, and what to change for it: more workers, and augmentation on the devices."""
        d = config.data
        advice = f"raise data.workers (now {d.workers})"
        if d.augment.enabled and d.augment.on == "host":
            advice += " or set data.augment.on=device (augmentation on the accelerator, a fraction of the host's work)"
        return cls(config.train.input_wait_warning, advice)

    def next(self, iterator: Iterator):
        started = self.clock()
        batch = next(iterator)
        now = self.clock()
        if self._since is None:
            self._since = now  # the first batch (worker start-up) opens the first window, uncounted
        else:
            self._waited += now - started
        return batch

    def time_step(self, previous, current) -> None:
        """Measures the devices' time of the step whose outputs are `current` (`previous`: the step before's)."""
        jax.block_until_ready(previous)
        started = self.clock()
        jax.block_until_ready(current)
        self._device_step = self.clock() - started

    def scalars(self) -> dict[str, float]:
        """The figures of the window since the previous call (module docstring); opens the next window."""
        now = self.clock()
        wall = now - self._since if self._since is not None else 0.0
        out = {"input_wait_share": self._waited / wall if wall > 0 else 0.0}
        if not math.isnan(self._device_step):
            out["device_step_s"] = self._device_step
        self._waited, self._since, self._device_step = 0.0, now, math.nan
        return out

    def warning(self, scalars: dict[str, float]) -> str | None:
        """The run's one warning, the first time a window's share is above the threshold (0: never)."""
        share = scalars["input_wait_share"]
        if self.warned or not self.warn_share or share <= self.warn_share:
            return None
        self.warned = True
        return (
            f"warning: the devices waited for input {share:.0%} of the last logging window (more than "
            f"train.input_wait_warning = {self.warn_share:.0%}): the host does not prepare batches as fast as "
            f"the devices take them. To feed them, {self.advice}; `ssps-jax bench-input` measures the input alone."
        )

    @staticmethod
    def text(scalars: dict[str, float]) -> str:
        """The progress line's part: '| input wait 3%  device 83 ms/step'."""
        line = f"| input wait {scalars['input_wait_share']:.0%}"
        if "device_step_s" in scalars:
            line += f"  device {1000 * scalars['device_step_s']:.0f} ms/step"
        return line
