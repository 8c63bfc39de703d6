"""`ssps-jax bench`: the SSPS train step, one k-means run, memory and MFU on the devices present.

Everything runs on a mesh of every device with the training programs
(`train_step.make_train_step`, `ssps.clustering.make_cluster_fn`) and the
training layout (batch split over `data`, queues split along their rows),
on synthetic inputs (bench/synthetic.py). This module runs it all and
prints the table (bench/report.py):

  compile      lower + compile of the SSPS step, timed (and of the plain step).
  step         the SSPS step in the SSPS phase: queues full (random unit
               vectors, bench/ssps.py's `random_queues`), the epoch's k-means
               done on them, so every step samples and replaces positives (the
               coverage is reported). Median of `steps` steps after `warmup`,
               each waited for with `jax.block_until_ready`; samples/s =
               global batch / median step.
  SSPS share   (a) in the step: the plain step (the same step program without
               SSPS, on the same state and batch) and the y^ forward alone
               (encoder, inference mode, 4 s reference crop) take turns with
               the SSPS step, one of each per round, so that load drifting
               during the run hits all three alike. Per round, (SSPS - plain)
               / SSPS is all SSPS adds to a step (y^ + sampling + queue
               writes) and (SSPS - plain - y^) / SSPS its sampling and queue
               writes; medians over rounds are reported. The second is a
               difference of timings: noisy when small.
               (b) isolated: bench/ssps.py's `make_sampling_step` (sampling +
               queue writes as their own program) at the same sizes / SSPS step.
  k-means      one run of the training clustering program (10 iterations + the
               final E-step + neighbour table) on the reference queue, at the
               size bench/sizing.py picks. D = the config's encoder_dim.
  memory       bench/memory.py.
  FLOPs, MFU   bench/flops.py: XLA's count, or the analytic one where XLA's
               is implausible (GPU convolutions are custom calls it does not count).
  bytes        XLA's bytes accessed by the SSPS step per device; with
               `bytes_by_op` (`--bytes-by-op N`), where they go
               (bench/hlo_bytes.py), printed after the table.
  --baseline   bench/baseline.py.

What XLA's C++ code prints while all this runs (rematerialization and
allocator warnings near the memory limit) goes to a file, not the screen
(`timing.messages_to`); one line says how many lines it holds and where.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ssps_jax import methods, sharding
from ssps_jax.bench import hlo_bytes
from ssps_jax.bench.baseline import compare, run_baseline
from ssps_jax.bench.flops import analytic_step_flops, counted_flops, mfu
from ssps_jax.bench.memory import peak_memory
from ssps_jax.bench.report import table
from ssps_jax.bench.sizing import kmeans_size
from ssps_jax.bench.ssps import Sizes, make_sampling_step
from ssps_jax.bench.synthetic import full_queues, make_reference_embed, synthetic_batch
from ssps_jax.bench.timing import devices_line, median_seconds, messages_to, timed
from ssps_jax.build import Run, build
from ssps_jax.hardware import peak_flops


def bench_config(
    config: ml_collections.ConfigDict, batch: int | None = None, dtype: str | None = None
) -> ml_collections.ConfigDict:
    """A copy of `config` with the --batch / --dtype shorthands applied and SSPS switched on."""
    config = config.copy_and_resolve_references()
    if batch:
        config.train.global_batch_size = batch
    if dtype:
        config.model.dtype = dtype
    config.ssps.enabled = True  # the bench measures the SSPS step; the config's ssps section sets its sizes
    return config


def _lower_and_compile(fn, *args):
    """(compiled, seconds to lower, seconds to compile)."""
    started = time.perf_counter()
    lowered = fn.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, lowered_at - started, time.perf_counter() - lowered_at


def run(
    config: ml_collections.ConfigDict,
    *,
    steps: int = 20,
    warmup: int = 3,
    kmeans_n: int | None = None,
    kmeans_k: int | None = None,
    baseline: str | None = None,
    seed: int = 0,
    bytes_by_op: int = 0,
) -> dict:
    """Runs the whole benchmark on `config` (see bench_config for --batch / --dtype); returns the figures.

    With `bytes_by_op`, result["ssps_step_bytes_account"] is the SSPS step's byte account
    (hlo_bytes.summary, that many ops).
    """
    config = bench_config(config)
    mesh = sharding.make_mesh()
    s, batch_size = config.ssps, config.train.global_batch_size
    if batch_size % mesh.size:
        raise ValueError(f"global batch {batch_size} is not divisible by the {mesh.size} devices")
    warmup = max(1, warmup)  # the first call is never in the median

    views, pos_dim = methods.get(config.method).positive_shape(config)
    pos_bytes = views * s.pos_queue_size * pos_dim * jnp.dtype(s.queue_dtype).itemsize // mesh.size
    n, k, why = kmeans_size(config, mesh, kmeans_n, kmeans_k, pos_bytes)
    per_epoch = n // batch_size
    if per_epoch < 2 * (warmup + steps):  # SSPS and plain steps take turns, both counting steps
        raise ValueError(
            f"N {n} is {per_epoch} steps of {batch_size}: the {2 * (warmup + steps)} steps timed must stay in "
            "the epoch that was clustered; raise --kmeans-n"
        )
    sizes = Sizes(
        n=n,
        k=k,
        dim=config.model.encoder_dim,
        batch=batch_size,
        queue=s.pos_queue_size,
        iterations=s.kmeans_iterations,
        neighbours=s.inter_sampling_size,
        sampling=s.sampling,
        queue_dtype=s.queue_dtype,
    )
    if sizes.queue > n or (sizes.clustered and k > n - n % batch_size):
        raise ValueError(f"N {n} is too small for Q' {sizes.queue} and K {k}")

    result = {
        "devices": devices_line(),
        "device_count": mesh.size,
        "method": config.method,
        "encoder": config.model.encoder,
        "channels": list(config.model.ecapa_tdnn.channels) if config.model.encoder == "ecapa_tdnn" else None,
        "encoder_dim": config.model.encoder_dim,
        "dtype": config.model.dtype,
        "global_batch": batch_size,
        "crops": config.data.crops.to_dict(),
        **{f"ssps_{key}": value for key, value in dataclasses.asdict(sizes).items() if key != "batch"},
        "kmeans_size_reason": why,
    }

    # The run as training builds it, its state in the SSPS phase: full queues, step at the start of epoch
    # start_epoch.
    with config.unlocked():
        config.seed, config.ssps.kmeans_clusters = seed, k
    run, state = build(config, mesh, n)
    model = run.model
    replicated = sharding.replicated(mesh)
    state = state.replace(ssps=None)  # frees the empty queues: the random full ones below take their place
    start = s.start_epoch * per_epoch
    state = state.replace(
        ssps=full_queues(config, mesh, sizes, seed), step=jax.device_put(jnp.int32(start), replicated)
    )
    queue_bytes = sum(x.nbytes for x in (state.ssps.ref_index, state.ssps.ref_emb, state.ssps.pos_index))
    result["queue_mib_per_device"] = (queue_bytes + state.ssps.pos_emb.nbytes) / mesh.size / 2**20

    # One k-means run: the epoch's clustering, which also makes the steps below sample for real.
    if sizes.clustered:
        state, figures = _cluster_once(run, state, seed)
        result.update(figures)

    # The SSPS step, the plain step and the y^ forward alone, on the same state and batch, taking turns.
    batch = synthetic_batch(config, mesh, n, seed)
    keys = [jax.device_put(jax.random.PRNGKey(seed + i), replicated) for i in range(warmup + steps)]
    ssps_compiled, figures = _compile("ssps_step", run.ssps_step, state, batch, keys[0])
    result.update(figures)
    if bytes_by_op > 0:
        ops = hlo_bytes.account(ssps_compiled.as_text())
        result["ssps_step_bytes_account"] = hlo_bytes.summary(ops, bytes_by_op)
    plain_compiled, figures = _compile("plain_step", run.plain_step, state, batch, keys[0])
    result.update(figures)
    embed = make_reference_embed(model, mesh)
    metrics = {"ssps_step": [], "plain_step": []}

    def step_call(name: str, compiled):
        def call():
            nonlocal state
            state, m = compiled(state, batch, keys[len(metrics[name])])
            metrics[name].append(m)
            return state, m

        return call

    # The reference forward alone, with the first parameters (their values do not change its time; the step's
    # own forward reads the parameters the step gathered, a copy made here once).
    variables = run.eval_variables(state)
    first, times = _interleaved(
        {
            "ssps_step": step_call("ssps_step", ssps_compiled),
            "plain_step": step_call("plain_step", plain_compiled),
            "reference_embed": lambda: embed(variables, batch["reference"]),
        },
        steps,
        warmup,
    )
    for name in times:
        result[f"{name}_first_call_s"] = first[name]
        result[f"{name}_s"] = statistics.median(times[name])
    ssps_s, plain_s, embed_s = (times[name] for name in ("ssps_step", "plain_step", "reference_embed"))
    # Shares as medians over rounds of per-round differences: what the load did to a round, it did to all three.
    result["ssps_share_in_step"] = statistics.median((s - p) / s for s, p in zip(ssps_s, plain_s))
    result["sampling_share_in_step"] = statistics.median((s - p - r) / s for s, p, r in zip(ssps_s, plain_s, embed_s))
    result["coverage"] = float(np.mean([_local_mean(m["ssps/coverage"]) for m in metrics["ssps_step"]]))
    result["loss_finite"] = bool(np.isfinite(_local_mean(metrics["ssps_step"][-1]["loss"])))
    result["samples_per_s"] = batch_size / result["ssps_step_s"]
    result["analytic_flops_per_device"] = analytic_step_flops(run, state, batch, run.eval_variables(state)) / mesh.size

    # SSPS sampling + queue writes alone (bench/ssps.py's program), at the same sizes, in the clustered
    # epoch so that it samples; it takes the queues (donated): the train state is done with after this.
    y_ref = embed(run.eval_variables(state), batch["reference"])
    sample = make_sampling_step(mesh, sizes, per_epoch)
    step_numbers = [jnp.int32(start + i) for i in range(len(keys))]
    result.update(_time_sampling(sample, state.ssps, step_numbers, batch["index"], y_ref, keys, steps, warmup))
    result["sampling_share_isolated"] = result["sampling_step_s"] / result["ssps_step_s"]

    # FLOPs and MFU.
    flops = result["ssps_step_flops_per_device"]
    result["counted_over_analytic"] = flops / result["analytic_flops_per_device"] if flops else None
    ssps_s = result["ssps_step_s"]
    result["flops_per_s_per_device"] = flops / ssps_s if flops else None
    peak = peak_flops(jax.devices()[0].device_kind, config.model.dtype)
    result["peak_flops_per_device"] = peak
    result.update(mfu(flops, result["analytic_flops_per_device"], ssps_s, peak))

    result["peak_memory_bytes"], result["peak_memory_kind"] = peak_memory()
    if baseline:
        result["baselines"] = run_baseline(baseline, config, k, steps, warmup, seed)
        result["comparisons"] = [compare(result, theirs) for theirs in result["baselines"]]
    return result


def _cluster_once(run: Run, state, seed: int):
    """(state with the clustering of epoch ssps.start_epoch, figures): one timed run of the training program."""
    s, replicated = run.ssps, sharding.replicated(run.mesh)
    key = jax.device_put(jax.random.PRNGKey(seed), replicated)
    epoch = jax.device_put(jnp.int32(s.start_epoch), replicated)
    compiled, lower_s, compile_s = _lower_and_compile(s.cluster_program(), state.ssps, key, epoch)
    out = {}

    def once():
        out["ssps"] = compiled(state.ssps, key, epoch)  # donates the old clustering
        return out["ssps"]

    seconds = timed(once)
    figures = {
        "kmeans_compile_s": lower_s + compile_s,
        "kmeans_s": seconds,
        "kmeans_iteration_s": seconds / (s.kmeans_iterations + 1),
    }
    return state.replace(ssps=out["ssps"]), figures


def _local_mean(x: jax.Array) -> float:
    """Mean of this process's shards of x (equal-sized): all of x on one host, what it can read on a pod."""
    return float(np.mean([np.mean(shard.data) for shard in x.addressable_shards]))


def _compile(name: str, step_fn, state, batch: dict, key) -> tuple:
    """(compiled step, figures): lower and compile timed apart, and XLA's FLOP count of the program."""
    compiled, lower_s, compile_s = _lower_and_compile(step_fn, state, batch, key)
    figures = {
        f"{name}_lower_s": lower_s,
        f"{name}_compile_s": compile_s,
        f"{name}_flops_per_device": counted_flops(compiled),
        f"{name}_bytes_per_device": counted_flops(compiled, "bytes accessed"),
    }
    return compiled, figures


def _interleaved(calls: dict, steps: int, warmup: int) -> tuple[dict, dict]:
    """(seconds of each call's first run, seconds of its `steps` timed runs): the calls take turns.

    `warmup` rounds (the first timed on its own), then `steps` rounds; load that
    drifts during the run (other processes, clocks) hits every call of a round alike.
    """
    first = {name: timed(fn) for name, fn in calls.items()}
    for _ in range(warmup - 1):
        for fn in calls.values():
            timed(fn)
    times = {name: [] for name in calls}
    for _ in range(steps):
        for name, fn in calls.items():
            times[name].append(timed(fn))
    return first, times


def _time_sampling(sample, queues, step_numbers: list, index, y_ref, keys: list, steps: int, warmup: int) -> dict:
    """Median seconds and coverage of bench/ssps.py's sampling + queue-write program; donates `queues`."""
    calls, masks = iter(zip(step_numbers, keys)), []

    def once():
        nonlocal queues
        step, key = next(calls)
        queues, positives, mask = sample(queues, step, index, y_ref, key)
        masks.append(mask)
        return positives, mask

    first, median = median_seconds(once, steps, warmup)
    coverage = float(np.mean([_local_mean(m) for m in masks]))
    return {"sampling_first_call_s": first, "sampling_step_s": median, "sampling_coverage": coverage}


def main(
    config: ml_collections.ConfigDict,
    *,
    steps: int,
    warmup: int,
    batch: int | None,
    dtype: str | None,
    kmeans_n: int | None,
    kmeans_k: int | None,
    json_path: str | None,
    baseline: str | None,
    bytes_by_op: int = 0,
) -> dict:
    """`ssps-jax bench`: runs, prints the table (and the byte account), writes the JSON.

    XLA's own messages go to <json>.xla.log (or a file in the temporary folder).
    """
    config = bench_config(config, batch, dtype)
    log = f"{json_path}.xla.log" if json_path else str(Path(tempfile.gettempdir()) / "ssps-jax-bench.xla.log")
    with messages_to(log) as messages:
        result = run(
            config,
            steps=steps,
            warmup=warmup,
            kmeans_n=kmeans_n,
            kmeans_k=kmeans_k,
            baseline=baseline,
            seed=config.seed,
            bytes_by_op=bytes_by_op,
        )
    if jax.process_index() == 0:
        print(table(result), flush=True)
        if "ssps_step_bytes_account" in result:
            account = hlo_bytes.render(result["ssps_step_bytes_account"], result["ssps_step_bytes_per_device"])
            print("\nSSPS step: " + account)
        if messages["lines"]:
            print(f"XLA printed {messages['lines']} lines of messages while this ran (kept in {log})")
        if json_path:
            Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
            print(f"written to {json_path}")
    return result
