"""Progress lines: steps/s, samples/s and ETA against a fake clock (ssps_jax/observe.py).

The clock is advanced by hand the way a run spends time: a first step that compiles, steady steps, an
evaluation (paused) and a resume; every figure a line prints is checked against the hand count.
"""

import math

import pytest

from ssps_jax.observe import Progress

BATCH = 64


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _run(progress: Progress, clock: Clock, steps, seconds_each: float, log_every: int) -> dict[int, dict]:
    """Steps each taking `seconds_each`; the rates of the lines at multiples of `log_every` (and the last)."""
    lines = {}
    for step in steps:
        clock.t += seconds_each
        progress.finished(step)
        if step % log_every == 0 or step == steps[-1]:
            lines[step] = progress.rates()
    return lines


def test_first_line_excludes_the_compiled_first_step_and_every_line_has_its_own_rate():
    clock = Clock()
    progress = Progress(total_steps=8, steps_per_epoch=4, global_batch=BATCH, start_step=0, clock=clock)
    clock.t += 30.0  # building, compiling and running step 1
    progress.finished(1)
    lines = _run(progress, clock, [2, 3, 4], 0.5, log_every=4)  # one line, at the epoch's last step
    assert lines[4] == {"steps_per_s": pytest.approx(2.0), "samples_per_s": pytest.approx(2.0 * BATCH)}
    assert progress.eta() == pytest.approx(4 / 2.0)

    # An evaluation between the epochs is not training time; a slower epoch shows in its own line.
    with progress.paused():
        clock.t += 100.0
    lines = _run(progress, clock, [5, 6, 7, 8], 0.25, log_every=3)
    assert lines[6]["steps_per_s"] == pytest.approx(4.0)  # steps 5-6: 2 steps in 0.5 s
    assert lines[8]["samples_per_s"] == pytest.approx(4.0 * BATCH)  # the epoch's (and run's) last, shorter window
    assert progress.overall()["steps_per_s"] == pytest.approx(7 / (3 * 0.5 + 4 * 0.25))
    assert progress.eta() == 0
    summary = progress.summary()
    assert summary.startswith("trained steps 1-8 of 8 in 0m32s (+1m40s evaluating): ")
    assert f"{7 / 2.5 * BATCH:.1f} samples/s" in summary


def test_a_first_line_at_the_first_step_counts_it_with_its_compilation():
    clock = Clock()
    progress = Progress(total_steps=4, steps_per_epoch=4, global_batch=BATCH, start_step=0, clock=clock)
    lines = _run(progress, clock, [1, 2], 10.0, log_every=1)
    assert lines[1]["steps_per_s"] == pytest.approx(0.1) and lines[2]["steps_per_s"] == pytest.approx(0.1)
    assert progress.eta() == pytest.approx(2 / 0.1)


def test_a_resumed_run_counts_only_its_own_steps_and_time():
    clock = Clock(t=5e6)  # a clock far from 0, as perf_counter's
    progress = Progress(total_steps=100, steps_per_epoch=10, global_batch=BATCH, start_step=60, clock=clock)
    clock.t += 20.0  # restore and compile
    progress.finished(61)
    lines = _run(progress, clock, list(range(62, 71)), 2.0, log_every=5)
    assert lines[65]["steps_per_s"] == pytest.approx(0.5)  # steps 62-65 after the compiled 61
    assert lines[70]["steps_per_s"] == pytest.approx(0.5)  # the epoch's last line
    assert progress.eta() == pytest.approx(30 / 0.5)  # 30 steps left at this process's rate
    assert progress.line(70, {"loss": 1.0, "lr": 1e-3, **lines[70]}).endswith(
        "| 32.0 samples/s  0.50 steps/s  ETA 1m00s"
    )
    assert progress.summary().startswith("trained steps 61-70 of 100 in 0m38s: 32.0 samples/s")


def test_no_rate_before_a_step_is_done():
    progress = Progress(total_steps=4, steps_per_epoch=4, global_batch=BATCH, start_step=0, clock=Clock())
    assert math.isnan(progress.eta())
    assert progress.line(0, {"loss": 1.0, "lr": 1e-3, "samples_per_s": 0.0, "steps_per_s": 0.0}).endswith("ETA ?")
