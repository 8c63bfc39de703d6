"""The training loop: data, sharded steps, checkpoints, evaluation, logging.

`train(config, workdir)` trains from scratch, or resumes from the latest
checkpoint in `workdir` exactly where it stopped: same parameters, optimizer
and BatchNorm state, same RNG, same position in the input stream, hence the
same per-step losses as an uninterrupted run.

Everything the loop runs comes from `build` (ssps_jax/build.py): the step
program of each epoch (`Run.step_program`) and, at every epoch start,
`SSPS.before_epoch` (the epoch's clustering when SSPS needs one). Step
metrics are fetched one step late, so the host prepares batch s+1 while the
devices run step s. A non-finite loss stops the run with its step number;
checkpoints are only written once every earlier loss has been checked, so
the latest checkpoint is always a good one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable

import jax
import ml_collections
from etils import epath
from jax.experimental import multihost_utils

from data_pipelines import input_pipeline
from ssps_jax import checkpoint, methods, preemption, sharding
from ssps_jax import config as config_lib
from ssps_jax.build import build
from ssps_jax.evaluation import verification
from ssps_jax.input_wait import InputWait
from ssps_jax.observe import MetricWriter, Progress, duration, say
from ssps_jax.train_state import TrainState


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message has the step and the checkpoint to resume from."""


def _load_source(config: ml_collections.ConfigDict):
    """The prepared train split; with several processes, process 0 builds it while the others wait."""
    if jax.process_count() == 1:
        return input_pipeline.load_source(config.data)
    if jax.process_index() == 0:
        source = input_pipeline.load_source(config.data)
    multihost_utils.sync_global_devices("ssps_jax: train data prepared")
    return source if jax.process_index() == 0 else input_pipeline.load_source(config.data)


def save_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    """Writes <workdir>/config.json (process 0), keeping a different earlier one as config.json.previous."""
    if jax.process_index() != 0:
        return
    path = workdir / "config.json"
    text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
    if path.exists() and path.read_text() != text:
        say(f"note: the config differs from the one {workdir} was started with; the old one is config.json.previous")
        path.replace(workdir / "config.json.previous")
    path.write_text(text)


def train(
    config: ml_collections.ConfigDict,
    workdir: epath.PathLike,
    on_step: Callable[[int, TrainState], None] | None = None,
) -> dict:
    """Trains or resumes; returns the last evaluation's results ({} if none ran).

    `on_step(steps_done, state)` is called after each step is dispatched (tests
    use it to look at the state, or to interrupt a run).
    """
    began = time.perf_counter()
    workdir = epath.Path(workdir)
    mesh = sharding.make_mesh()
    config_lib.validate(config, device_count=mesh.size)
    for line in config_lib.ineffective_settings(config):
        say(f"warning: {line}")
    written, config = config, config_lib.resolve_paths(config)  # relative data / eval paths under data.base_dir

    # Everything that can refuse the run does so before the workdir is written: the config, then what needs
    # the prepared data (prepared on first use, in its own folder): the SSPS sizes against the dataset's, the
    # labels a method or the oracle needs (build), the test files' headers (the evaluator).
    source = _load_source(config)
    batch_size = config.train.global_batch_size
    # The index file's labels feed the SSPS diagnostics and the methods trained on them (supervised):
    # not read (nor warned about) otherwise.
    wants_labels = config.ssps.enabled or methods.get(config.method).needs_labels
    labels = input_pipeline.train_labels(config.data, len(source)) if wants_labels else None
    run, state = build(config, mesh, len(source), labels=labels)
    per_epoch = run.steps_per_epoch
    stop = (config.train.stop_at_epoch or config.train.epochs) * per_epoch  # where this run stops
    # Reads the test files' headers now: a bad one fails before the input workers start.
    evaluator = verification.make_trial_evaluator(config, run.model, mesh)

    dataset = input_pipeline.train_dataset(
        source,
        global_batch_size=batch_size,
        seed=config.seed,
        examples=input_pipeline.make_examples(config.data),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    iterator = input_pipeline.make_iterator(dataset, workers=config.data.workers, prefetch=config.data.prefetch)
    ckpt = checkpoint.Checkpointer(
        workdir / "checkpoints", config.train.keep_checkpoints, config.train.async_checkpoints
    )
    try:  # a checkpoint of another model is refused here, before anything is written to the workdir
        restored = ckpt.restore_newest(state, iterator, config=config)
    except BaseException:
        ckpt.close()
        iterator.close()
        raise
    if restored is not None:
        latest, state, _ = restored
        say(f"resumed from the checkpoint of step {latest} in {workdir}")
    save_config(written, workdir)  # as written: `evaluate` resolves it again, where it runs
    start = int(state.step)
    say(
        f"{len(source)} utterances, {per_epoch} steps of {batch_size} per epoch, {config.train.epochs} epochs, "
        f"{mesh.size} device(s) on {jax.process_count()} process(es); workdir {workdir}"
    )

    writer = MetricWriter(workdir)
    last_results: dict = {}

    def evaluate(step: int) -> None:
        nonlocal last_results
        started = time.perf_counter()
        with progress.paused():
            results, scores = evaluator.evaluate(run.eval_variables(state))
        seconds = time.perf_counter() - started
        if jax.process_index() == 0:
            evaluator.write(
                workdir / "eval" / f"step_{step}", results, scores, {"step": step, "epoch": step / per_epoch}
            )
        # <list>/<cosine|s-norm|as-norm>/<metric>, and what the evaluation cost the run
        writer.write(step, {**verification.scalars(results), "seconds": seconds}, kind="eval")
        say(f"eval step {step} ({seconds:.0f} s):")
        for line in verification.summary_lines(results):
            say(f"  {line}")
        last_results = results

    progress = Progress(stop, per_epoch, batch_size, start)
    pending: list[tuple[int, dict]] = []
    waits = InputWait.from_config(config)  # input wait share and the devices' step time (ssps_jax/input_wait.py)

    def drain() -> None:
        """Fetches the metrics of dispatched steps; logs them; stops on a non-finite loss."""
        for done, metrics in pending:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            # Diagnostics without a value this step (no pseudo-positive with a known label) are NaN: not logged.
            metrics = {k: v for k, v in metrics.items() if math.isfinite(v) or k == "loss"}
            if not math.isfinite(metrics["loss"]):
                writer.write(done, metrics)
                raise NonFiniteLossError(
                    f"loss is {metrics['loss']} at step {done} (epoch {(done - 1) // per_epoch + 1}); training "
                    f"stopped. The last good checkpoint is step {ckpt.latest_step()} in {workdir / 'checkpoints'}, "
                    "and running the same command again resumes from it: lower optim.learning_rate or set "
                    "optim.clip_grad_norm first."
                )
            progress.finished(done)
            if done % config.train.log_every_steps == 0 or done == stop:
                metrics["lr"] = float(run.schedule(done - 1))
                metrics.update(progress.rates())
                metrics.update(waits.scalars())
                writer.write(done, metrics)
                say(f"{progress.line(done, metrics)}  {waits.text(metrics)}")
                if warning := waits.warning(metrics):
                    say(warning)
        pending.clear()

    def evaluation_due(done: int) -> bool:
        every = config.eval.every_epochs
        epoch_end = done % per_epoch == 0
        return bool(evaluator and epoch_end and every and ((done // per_epoch) % every == 0 or done == stop))

    # From here on SIGTERM / SIGINT stop every process at one step, saved (ssps_jax/preemption.py).
    watch = preemption.Watch(ckpt.manager).start()
    try:
        if evaluator and config.eval.at_start and start == 0:
            evaluate(0)
        if start > 0 and evaluation_due(start) and not (workdir / "eval" / f"step_{start}" / "metrics.json").is_file():
            evaluate(start)  # the run was stopped between this checkpoint and its evaluation
        for step in range(start, stop):
            epoch = step // per_epoch
            if step == start or step % per_epoch == 0:
                queues, scalars = run.ssps.before_epoch(state.ssps, epoch, state.rng)
                state = state.replace(ssps=queues)
                if scalars:
                    writer.write(epoch * per_epoch, scalars, kind="ssps")
            batch = sharding.global_batch(waits.next(iterator), mesh)
            state, metrics = run.step_program(epoch)(state, batch, jax.random.fold_in(state.rng, step))
            done = step + 1
            if done % config.train.log_every_steps == 0 or done == stop:  # a logged step: its device time too
                waits.time_step(pending[-1][1] if pending else None, metrics)
            drain()  # the previous step's metrics, while this one runs
            pending.append((done, metrics))
            if on_step is not None:
                on_step(done, state)
            epoch_end = done % per_epoch == 0
            preempted = watch.reached(done)  # every process, every step: they stop at the same one
            if epoch_end or done % config.train.checkpoint_every_steps == 0 or preempted:
                drain()  # never checkpoint a state whose loss has not been checked
                started = time.perf_counter()
                ckpt.save(done, state, iterator, {"step": done, "epoch": done // per_epoch})
                writer.write(done, {"seconds": time.perf_counter() - started}, kind="checkpoint")  # the loop's wait
                writer.sync()  # a gs:// workdir's metrics.jsonl holds every step up to the checkpoint
            if preempted:
                ckpt.wait()
                stopped = preemption.Preempted(done, ckpt.directory)
                say(str(stopped))
                raise stopped  # the CLI exits with preemption.PREEMPTED; a rerun resumes from `done`
            if evaluation_due(done):
                ckpt.wait()  # the epoch's checkpoint committed first: a kill during a long evaluation retrains nothing
                evaluate(done)
        drain()
        if start >= stop:
            say(f"{workdir} has already trained all {stop} steps")
        else:
            say(progress.summary())
            _say_where(workdir, last_results, ckpt.latest_step(), time.perf_counter() - began)
    finally:
        try:
            ckpt.wait()
            ckpt.close()
            writer.close()
            iterator.close()
        finally:
            watch.stop()  # last: a signal while the above runs is still a preemption's, not a KeyboardInterrupt
    return last_results


def _say_where(workdir: epath.Path, results: dict, step: int | None, seconds: float) -> None:
    """The end of a run: its wall time, its last evaluation, and where its files are."""
    for name, r in results.items():
        kinds = [k for k in r if k != "trials"]
        say(f"last evaluation, {name}: " + ", ".join(f"{k} EER {100 * r[k]['eer']:.2f}%" for k in kinds))
    evaluations = sorted((workdir / "eval").glob("step_*"), key=lambda p: int(p.name.removeprefix("step_")))
    say(
        f"done in {duration(seconds)} wall time. {workdir}: checkpoints/ (newest: step {step}), metrics.jsonl, "
        f"tensorboard/ (tensorboard --logdir {workdir})"
        + (f", {evaluations[-1].relative_to(workdir)}/ (metrics.json, scores)" if evaluations else "")
        + f"; curves and DET as PNG: ssps-jax plot {workdir}"
    )


def load_config(workdir: epath.PathLike) -> ml_collections.ConfigDict:
    """The config a workdir was trained with."""
    path = epath.Path(workdir) / "config.json"
    if not path.is_file():
        raise config_lib.ConfigError(f"{path} not found: is {workdir} a training workdir?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))
