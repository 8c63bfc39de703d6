"""Stopping training for a preemption: every process at the same step, that step saved, a documented exit status.

Spot and preemptible Cloud TPU VMs, maintenance events and SLURM's preemption
(`--signal`, `scancel`) send SIGTERM some seconds before a host is taken away.
While `train` runs its steps inside `Watch`, a SIGTERM (or SIGINT, Ctrl-C)
makes it finish the step it is at, save a checkpoint of it, print one line
and exit with status PREEMPTED (75, EX_TEMPFAIL of sysexits.h: "try again").
Running the same command again resumes from that checkpoint exactly.

* Several processes (jax.distributed): the signal reaches one host, or some,
  or all. JAX's preemption service, started by `jax.distributed.initialize`,
  catches SIGTERM on each process and agrees with all of them, through the
  distributed runtime, on the first step every process can still reach;
  `reached(step)` (orbax's `CheckpointManager.reached_preemption`, i.e.
  `multihost_utils.reached_preemption_sync_point`) turns True at that same
  step on every process. Every process calls it once per step. A SIGINT is
  passed on as a SIGTERM to its own process, so it goes the same way.
* One process (no distributed runtime): handlers of SIGTERM and SIGINT set
  a flag that `reached` reads between steps.

A second signal while that checkpoint is being written changes nothing: the
handlers (ours, and JAX's for SIGTERM) only set what is already set, so the
save completes and the process exits as above. Outside `Watch` (data
preparation, compilation before the first step) signals act as they always do.
"""

from __future__ import annotations

import signal
import threading

import jax
import orbax.checkpoint as ocp

PREEMPTED = 75  # the exit status of a run stopped for a preemption, its checkpoint saved: run it again
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped for a preemption at `step`, saved; the message is the line a user sees."""

    def __init__(self, step: int, checkpoints: str):
        super().__init__(
            f"stopped for a preemption at step {step}: checkpoint {step} is saved in {checkpoints}; run the same "
            f"command again to resume from it (exit status {PREEMPTED})"
        )
        self.step = step
        self.status = PREEMPTED


class Watch:
    """Notices preemption signals between `start()` and `stop()` (or as a context manager); see the module docstring."""

    def __init__(self, manager: ocp.CheckpointManager):
        self._manager = manager
        self._signalled: int | None = None
        self._previous: dict[int, object] = {}
        # JAX's preemption service runs where the distributed runtime does, unless it was turned off
        # (jax_enable_preemption_service): then a multi-process run is stopped by signals as before.
        self.agreed = jax.process_count() > 1 and getattr(jax.config, "jax_enable_preemption_service", True)
        self.alone = jax.process_count() == 1

    def __enter__(self) -> Watch:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> Watch:
        """Installs the handlers (from the main thread; elsewhere Python cannot, and nothing is watched)."""
        if threading.current_thread() is not threading.main_thread():
            return self  # Python sets signal handlers from the main thread only
        own = (signal.SIGINT,) if self.agreed else SIGNALS if self.alone else ()  # with agreement SIGTERM is JAX's
        for signum in own:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def stop(self) -> None:
        """Puts back the handlers that were there before `start`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.agreed:
            signal.raise_signal(signal.SIGTERM)  # to JAX's handler: the processes agree on a step
        elif self._signalled is None:
            self._signalled = signum

    def reached(self, step: int) -> bool:
        """Whether training stops after `step` (steps done) to save it; call it once per step on every process."""
        if self.agreed:
            return self._manager.reached_preemption(step)
        return self.alone and self._signalled is not None
