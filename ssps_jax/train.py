"""The training loop: data, sharded steps, checkpoints, evaluation, logging.

`train(config, workdir)` trains from scratch, or resumes from the latest
checkpoint in `workdir` exactly where it stopped: same parameters, optimizer
and BatchNorm state, same RNG, same position in the input stream, hence the
same per-step losses as an uninterrupted run.

Step metrics are fetched one step late, so the host prepares batch s+1 while
the devices run step s. A non-finite loss stops the run with its step
number; checkpoints are only written once every earlier loss has been
checked, so the latest checkpoint is always a good one.

With SSPS, two step programs exist (with and without the queues) and the
epoch picks one; clustering runs at the start of every epoch from
`ssps.start_epoch` on (unless the state already holds that epoch's, as after
a resume mid-epoch), and logs its time and NMI against speakers and sessions.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from data_pipelines import input_pipeline, speaker_corpus
from ssps_jax import checkpoint, methods, sharding
from ssps_jax import config as config_lib
from ssps_jax.evaluation.embedding import Embedder
from ssps_jax.evaluation.verification import Verifier
from ssps_jax.observe import MetricWriter, Progress, say
from ssps_jax.ssps import sampling
from ssps_jax.ssps.clustering import make_cluster_fn, nmi
from ssps_jax.ssps.state import init_ssps_state
from ssps_jax.ssps.step import SSPSStep
from ssps_jax.train_state import TrainState, init_train_state, partition_specs
from ssps_jax.train_step import DINOSettings, SimCLRSettings, make_train_step


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message has the step and the checkpoint to resume from."""


def make_verifier(config: ml_collections.ConfigDict, model, mesh) -> Verifier | None:
    """Evaluation on config.eval.trials, or None when there are none."""
    if not config.eval.trials:
        return None

    def embed(variables, wave, lengths):
        return model.apply(variables, wave, lengths, method=type(model).embed)

    embedder = Embedder(
        embed,
        mesh,
        config.eval.batch_size,
        bucket_ratio=config.eval.bucket_ratio,
        min_bucket=round(config.eval.min_bucket_seconds * 16000),
    )
    return Verifier(list(config.eval.trials), config.eval.base_dir or config.data.base_dir, embedder)


def variables(state: TrainState) -> dict:
    """The variables evaluation embeds with: the teacher's for DINO, the model's otherwise."""
    if state.teacher is not None:
        return state.teacher
    return {"params": state.params, "batch_stats": state.batch_stats}


def method_settings(config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int):
    """The static settings of the method's train step."""
    if config.method == "dino":
        d = config.dino
        return DINOSettings(
            student_temperature=d.student_temperature,
            teacher_temperature=d.teacher_temperature,
            teacher_temperature_warmup=d.teacher_temperature_warmup,
            teacher_temperature_warmup_epochs=d.teacher_temperature_warmup_epochs,
            center_momentum=d.center_momentum,
            start_tau=d.start_tau,
            end_tau=d.end_tau,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
        )
    return SimCLRSettings(temperature=config.simclr.temperature)


def init_ssps(config: ml_collections.ConfigDict, mesh, dataset_size: int, steps_per_epoch: int):
    """Empty queues sized for this dataset and batch; the diagnostics' labels."""
    s, batch = config.ssps, config.train.global_batch_size
    pos_capacity = s.pos_queue_size - s.pos_queue_size % batch
    # The reference queue holds one epoch (SPEC 3); for knn it is aligned with Q' instead.
    ref_capacity = pos_capacity if s.sampling == "knn" else steps_per_epoch * batch
    if s.sampling != "knn" and s.kmeans_clusters > ref_capacity:
        raise config_lib.ConfigError(
            f"config.ssps.kmeans_clusters: {s.kmeans_clusters} clusters for a reference queue of {ref_capacity} rows"
        )
    data_dir = config.data.tfds_dir or Path(config.data.base_dir) / "tfds"
    speaker, session = speaker_corpus.read_labels(
        speaker_corpus.index_path(data_dir, speaker_corpus.config_name(config.data.train_csv)), dataset_size
    )
    views, pos_dim = methods.positive_dim(config)
    return init_ssps_state(
        mesh,
        dataset_size=dataset_size,
        global_batch=batch,
        ref_capacity=ref_capacity,
        pos_capacity=pos_capacity,
        ref_dim=config.model.encoder_dim,
        pos_dim=pos_dim,
        views=views,
        clusters=s.kmeans_clusters if s.sampling != "knn" else 1,
        neighbours=s.inter_sampling_size,
        dtype=jnp.dtype(s.queue_dtype),
        speaker=speaker,
        session=session,
    )


def sampling_config(s: ml_collections.ConfigDict) -> sampling.SamplingConfig:
    """The pseudo-positive sampling of `config.ssps`."""
    return sampling.SamplingConfig(
        method=s.sampling,
        inter_size=s.inter_sampling_size,
        inter_exp=s.inter_sampling_prob == "exp",
        inter_lambda=s.inter_sampling_lambda,
        intra_size=s.intra_sampling_size,
        intra_exp=s.intra_sampling_prob == "exp",
        intra_lambda=s.intra_sampling_lambda,
    )


def ssps_step_settings(config: ml_collections.ConfigDict, steps_per_epoch: int) -> SSPSStep:
    s = config.ssps
    return SSPSStep(sampling=sampling_config(s), start_epoch=s.start_epoch, steps_per_epoch=steps_per_epoch)


def _load_source(config: ml_collections.ConfigDict):
    """The prepared train split; with several processes, process 0 builds it while the others wait."""
    if jax.process_count() == 1:
        return input_pipeline.load_source(config.data)
    if jax.process_index() == 0:
        source = input_pipeline.load_source(config.data)
    multihost_utils.sync_global_devices("ssps_jax: train data prepared")
    return source if jax.process_index() == 0 else input_pipeline.load_source(config.data)


def _save_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    if jax.process_index() != 0:
        return
    path = workdir / "config.json"
    text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
    if path.exists() and path.read_text() != text:
        say(f"note: the config differs from the one {workdir} was started with; the old one is config.json.previous")
        path.rename(workdir / "config.json.previous")
    path.write_text(text)


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    on_step: Callable[[int, TrainState], None] | None = None,
) -> dict:
    """Trains or resumes; returns the last evaluation's results ({} if none ran).

    `on_step(steps_done, state)` is called after each step is dispatched (tests
    use it to look at the state, or to interrupt a run).
    """
    workdir = Path(workdir)
    mesh = sharding.make_mesh()
    config_lib.validate(config, device_count=mesh.size)
    workdir.mkdir(parents=True, exist_ok=True)
    _save_config(config, workdir)

    source = _load_source(config)
    batch_size = config.train.global_batch_size
    per_epoch = input_pipeline.steps_per_epoch(len(source), batch_size)
    total = config.train.epochs * per_epoch  # what schedules (lr, DINO's tau) span
    stop = (config.train.stop_at_epoch or config.train.epochs) * per_epoch  # where this run stops
    model = methods.build_model(config, bn_axis_name=sharding.DATA)
    tx, schedule = methods.build_optimizer(config, per_epoch, total)
    state = init_train_state(
        model, tx, config.seed, methods.example_input(config), mesh, methods.teacher_outputs(config)
    )
    use_ssps = config.ssps.enabled
    if use_ssps:
        state = state.replace(ssps=init_ssps(config, mesh, len(source), per_epoch))
    verifier = make_verifier(config, model, mesh)  # reads the test audio: fails before workers start

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
    if (latest := ckpt.latest_step()) is not None:
        fresh = state.ssps
        state, _ = ckpt.restore(latest, state, iterator)
        if use_ssps:  # labels are data, not training state: this dataset's, not the checkpoint's
            state = state.replace(ssps=state.ssps.replace(speaker=fresh.speaker, session=fresh.session))
        say(f"resumed from the checkpoint of step {latest} in {workdir}")
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
        results, scores = verifier.evaluate(variables(state))
        seconds = time.perf_counter() - started
        if jax.process_index() == 0:
            verifier.write(
                workdir / "eval" / f"step_{step}", results, scores, {"step": step, "epoch": step / per_epoch}
            )
        for name, r in results.items():
            writer.write(step, {f"{name}/eer": r["eer"], f"{name}/min_dcf": r["min_dcf"]}, kind="eval")
            say(
                f"eval step {step}: {name}  EER {100 * r['eer']:.2f}%  minDCF {r['min_dcf']:.4f}  "
                f"({r['trials']} trials, {seconds:.0f} s)"
            )
        last_results = results

    specs = partition_specs(state)
    settings = method_settings(config, per_epoch, total)
    plain_step = make_train_step(model, tx, mesh, settings, specs)
    if use_ssps:
        ssps_step = make_train_step(model, tx, mesh, settings, specs, ssps_step_settings(config, per_epoch))
        cluster_fn = make_cluster_fn(
            mesh, config.ssps.kmeans_iterations, config.ssps.inter_sampling_size, config.ssps.kmeans_chunk_elements
        )
        clustered_epoch = int(state.ssps.clustered_epoch)
        labels = {"speaker": np.asarray(state.ssps.speaker), "session": np.asarray(state.ssps.session)}

    def cluster(epoch: int) -> None:
        """k-means of the reference queue for `epoch`; logs its time and the NMI diagnostics."""
        nonlocal state, clustered_epoch
        started = time.perf_counter()
        key = jax.random.fold_in(jax.random.split(state.rng)[1], epoch)
        state = state.replace(ssps=cluster_fn(state.ssps, key, jnp.int32(epoch)))
        assignment = np.asarray(state.ssps.assignment.addressable_data(0))
        seconds = time.perf_counter() - started
        clustered_epoch = epoch
        present = assignment >= 0
        scalars = {"kmeans_seconds": seconds, "clusters_used": float(len(np.unique(assignment[present])))}
        for name, y in labels.items():
            if np.all(y[present] >= 0):
                scalars[f"nmi_{name}"] = nmi(y[present], assignment[present])
        writer.write(epoch * per_epoch, scalars, kind="ssps")
        say(
            f"ssps epoch {epoch + 1}: k-means in {seconds:.1f} s; "
            + ", ".join(f"{k} {v:.3f}" for k, v in scalars.items() if k != "kmeans_seconds")
        )

    progress = Progress(stop, per_epoch, batch_size, start, config.train.log_every_steps)
    pending: list[tuple[int, dict]] = []

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
            if done % config.train.log_every_steps == 0 or done == stop:
                metrics["lr"] = float(schedule(done - 1))
                metrics.update(progress.rates(done))
                writer.write(done, metrics)
                say(progress.line(done, metrics))
        pending.clear()

    try:
        if verifier and config.eval.at_start and start == 0:
            evaluate(0)
        for step in range(start, stop):
            epoch = step // per_epoch
            step_fn = plain_step
            if use_ssps and epoch >= config.ssps.start_epoch - 1:
                step_fn = ssps_step
                if epoch >= config.ssps.start_epoch and config.ssps.sampling != "knn" and clustered_epoch != epoch:
                    cluster(epoch)
            batch = sharding.global_batch(next(iterator), mesh)
            state, metrics = step_fn(state, batch, jax.random.fold_in(state.rng, step))
            done = step + 1
            drain()  # the previous step's metrics, while this one runs
            pending.append((done, metrics))
            if on_step is not None:
                on_step(done, state)
            epoch_end = done % per_epoch == 0
            if epoch_end or done % config.train.checkpoint_every_steps == 0:
                drain()  # never checkpoint a state whose loss has not been checked
                ckpt.save(done, state, iterator, {"step": done, "epoch": done // per_epoch})
            every = config.eval.every_epochs
            if verifier and epoch_end and every and ((done // per_epoch) % every == 0 or done == stop):
                evaluate(done)
        drain()
        if start >= stop:
            say(f"{workdir} has already trained all {stop} steps")
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
        iterator.close()
    return last_results


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config a workdir was trained with."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise config_lib.ConfigError(f"{path} not found: is {workdir} a training workdir?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))
