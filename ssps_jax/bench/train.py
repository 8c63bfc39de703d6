"""`ssps-jax bench`: the SSPS train step, one k-means run, memory and MFU on the devices present.

Everything runs on a mesh of every device with the training programs
(`train_step.make_train_step`, `ssps.clustering.make_cluster_fn`) and the
training layout (batch split over `data`, queues split along their rows).
Batches are synthetic random waveforms made on the devices, not grain: this
times the device step (`ssps-jax bench-input` times the input pipeline).

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
               final E-step + neighbour table) on the reference queue: paper
               scale (N = 1 092 009, K = the config's, 25 000 in the paper
               configs) or the largest N that fits the device memory; on CPU
               SPEC 11's comparison point (N = 100 000, K = 5 000). What ran,
               and why, is printed. D = the config's encoder_dim.
  memory       peak device memory over the whole run, k-means included
               (`memory_stats()["peak_bytes_in_use"]`, max over local
               devices); where a backend has none (CPU), the process's peak
               RSS, labelled as host memory.
  FLOPs, MFU   FLOPs per step per device from XLA's cost analysis of the
               compiled SSPS step (`compiled.cost_analysis()["flops"]`: every
               HLO op of the partitioned per-device program -- convolutions,
               matmuls, FFTs, elementwise work, the optimizer -- with loop
               bodies counted once; this step has no loop whose trip count
               matters). MFU = FLOPs / step time / the device's dense peak
               (PEAK_FLOPS; unknown on CPU, where only FLOP/s are printed).
               Cross-check: an analytic count of the Conv and Dense layers
               (2 x multiply-adds at the shapes they are called with, traced,
               `matmul_flops`) x 3 for forward + backward of the trained
               views, + 1 forward of the reference crop; everything else (mel
               front end, BatchNorm, loss, optimizer) is in the counted
               figure only, so counted / analytic is a little above 1.

`--baseline torch` runs the PyTorch reference step
(`ssps_jax.bench.torch_baseline.run_benchmark`) eager and compiled and puts
ours / theirs ratios in the same table.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import resource
import statistics
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipelines import crops as crops_lib
from ssps_jax import methods, sharding
from ssps_jax.bench.ssps import Sizes, make_sampling_step, random_queues
from ssps_jax.bench.timing import devices_line, median_seconds, timed
from ssps_jax.ssps import step as ssps_step
from ssps_jax.ssps.clustering import make_cluster_fn
from ssps_jax.train import method_settings, ssps_step_settings, variables
from ssps_jax.train_state import init_train_state, partition_specs
from ssps_jax.train_step import make_train_step

PAPER_N, PAPER_K, PAPER_D = 1_092_009, 25_000, 512  # VoxCeleb2 train utterances, prototypes, encoder_dim
CPU_N, CPU_K = 100_000, 5_000  # SPEC 11's CPU comparison point with sslsv

# Dense peak FLOP/s of one JAX device by compute dtype (bfloat16, float32), from the vendors' datasheets.
# The float32 figure is that of the unit XLA runs float32 matmuls and convolutions on at JAX's default
# precision: TF32 tensor cores on Ampere / Hopper GPUs, one bfloat16 pass on TPUs. The first name
# contained in the device kind wins, so more specific names come first.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 495e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12, 495e12),  # same compute as the H100 SXM (and GH200's Hopper)
    ("A100", 312e12, 156e12),  # SXM and PCIe
    ("TPU v4", 275e12, 275e12),
    ("TPU v5 lite", 197e12, 197e12),  # v5e
    ("TPU v5", 459e12, 459e12),  # v5p
    ("TPU v6 lite", 918e12, 918e12),  # v6e
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of one device of this kind computing in `dtype`; None if unknown (e.g. CPU)."""
    for name, bf16, fp32 in PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return bf16 if dtype == "bfloat16" else fp32
    return None


def counted_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled program per device, from XLA's cost analysis (None if not reported)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def matmul_flops(fn, *args) -> int:
    """2 x multiply-adds of every flax Conv and Dense call made by fn(*args), from the traced shapes.

    Nothing is computed: fn is traced abstractly (jax.eval_shape) and each
    layer's output size x its multiply-adds per output element is summed.
    Other layers are not counted (DINO's weight-normalised last layer: < 1% of
    an ECAPA-TDNN step).
    """
    total = 0

    def count(next_fun, args, kwargs, context):
        nonlocal total
        out = next_fun(*args, **kwargs)
        layer = context.module
        if context.method_name == "__call__" and isinstance(layer, (nn.Conv, nn.Dense)):
            fan_in = args[0].shape[-1]
            if isinstance(layer, nn.Conv):
                window = math.prod(np.atleast_1d(layer.kernel_size).tolist())
                fan_in = window * fan_in // layer.feature_group_count
            total += 2 * math.prod(out.shape) * fan_in
        return out

    with nn.intercept_methods(count):
        jax.eval_shape(fn, *args)
    return total


def analytic_step_flops(model, state, batch: dict, method: str, with_ssps: bool) -> int:
    """Conv + Dense FLOPs of one step on the global batch (see the module docstring)."""
    student = {"params": state.params, "batch_stats": state.batch_stats}
    if method == "dino":
        teacher = matmul_flops(lambda v, g: model.apply(v, g), state.teacher, batch["global_views"])
        trained = matmul_flops(
            lambda v, g, loc: model.apply(v, g, loc, False, method=type(model).student),
            student,
            batch["global_views"],
            batch["local_views"],
        )
        total = teacher + 3 * trained
    else:
        total = 3 * matmul_flops(lambda v, x: model.apply(v, x), student, batch["views"])
    if with_ssps:
        embedder = variables(state)  # the teacher's for DINO, as in the step
        total += matmul_flops(lambda v, r: model.apply(v, r, method=type(model).embed), embedder, batch["reference"])
    return total


def peak_memory() -> tuple[int, str]:
    """(bytes, what they are): peak device memory where the backend reports it, else the host's peak RSS."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    if all(s and "peak_bytes_in_use" in s for s in stats):
        return max(s["peak_bytes_in_use"] for s in stats), "device peak, max over local devices"
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host peak RSS (no device memory statistics)"


def kmeans_size(
    config: ml_collections.ConfigDict, mesh, n: int | None, k: int | None, pos_bytes: int
) -> tuple[int, int, str]:
    """(N, K, why): the reference queue rows and clusters of the k-means run (and of the queues the step uses)."""
    if n and k:
        return n, k, "as asked (--kmeans_n, --kmeans_k)"
    if jax.default_backend() == "cpu":
        n, k = n or CPU_N, k or CPU_K
        paper = 11 * 2 * PAPER_N * PAPER_K * PAPER_D
        why = (
            f"CPU backend: the paper size (N {PAPER_N}, K {PAPER_K}, D {PAPER_D}) is {paper:.1e} FLOP of E-steps "
            "alone, hours on a few cores; this is SPEC 11's CPU comparison point with sslsv "
            "(--kmeans_n/--kmeans_k to change it)"
        )
        return n, k, why
    n, k = n or PAPER_N, k or config.ssps.kmeans_clusters
    stats = [d.memory_stats() for d in jax.local_devices()]
    if not all(s and "bytes_limit" in s for s in stats):
        return n, k, "paper scale (no device memory statistics to check it against)"
    free = min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
    itemsize = jnp.dtype(config.ssps.queue_dtype).itemsize
    d, budget = config.model.encoder_dim, config.ssps.kmeans_chunk_elements

    def need(rows: int) -> float:
        # Per device: the queue's share, replicated per-index arrays (assignment, labels), centroids and
        # their sums, the E-step's chunk x K block twice; half the free memory is left for the train step.
        return rows * (d * itemsize + 4) / mesh.size + 12 * rows + 3 * k * d * 4 + 8 * budget + pos_bytes

    asked = n
    while need(n) > free / 2 and n > 2 * max(k, config.train.global_batch_size):
        n //= 2
    if n == asked:
        return n, k, "paper scale" if asked == PAPER_N else "as asked"
    return n, k, f"largest N that fits: N {asked} needs about {need(asked) / 2**30:.1f} GiB of {free / 2**30:.1f} free"


def synthetic_batch(config: ml_collections.ConfigDict, mesh, dataset_size: int, seed: int) -> dict:
    """A global batch of random waveforms with the method's crops (SPEC 2) and distinct indices, split on `mesh`."""
    crop_config = crops_lib.CropConfig(**config.data.crops)
    example = crops_lib.make_views(np.zeros(1, np.float32), crop_config, np.random.default_rng(0))
    shapes = {name: x.shape for name, x in sorted(example.items())}
    batch = config.train.global_batch_size

    def make():
        keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes) + 1)
        out = {name: 0.1 * jax.random.normal(key, (batch, *shape)) for key, (name, shape) in zip(keys, shapes.items())}
        out["index"] = jax.random.choice(keys[-1], dataset_size, (batch,), replace=False).astype(jnp.int32)
        return out

    return jax.jit(make, out_shardings=sharding.split_batch(mesh))()


def full_queues(config: ml_collections.ConfigDict, mesh, sizes: Sizes, seed: int):
    """bench/ssps.py's random full queues, with the positive queue shaped for this method (views, dimension)."""
    state = random_queues(mesh, sizes, seed)
    views, dim = methods.positive_dim(config)
    if state.pos_emb.shape[0] == views and state.pos_emb.shape[-1] == dim:
        return state
    # A projector or DINO head: the positive queue holds (views, ..., dim) rows instead of encoder outputs.
    shape = (views, *state.pos_emb.shape[1:-1], dim)

    def unit():
        x = jax.random.normal(jax.random.PRNGKey(seed + 1), shape, jnp.float32)
        return (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(state.pos_emb.dtype)

    pos = jax.jit(unit, out_shardings=NamedSharding(mesh, P(None, None, sharding.DATA)))()
    return state.replace(pos_emb=pos)


def make_reference_embed(model, mesh):
    """(variables, reference crops) -> y^: the SSPS step's reference forward as a program of its own."""

    def embed(v, reference):
        return ssps_step.normalise(model.apply(v, reference, method=type(model).embed))

    data = P(sharding.DATA)
    return jax.jit(jax.shard_map(embed, mesh=mesh, in_specs=(P(), data), out_specs=data, check_vma=False))


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
) -> dict:
    """Runs the whole benchmark on `config` (see bench_config for --batch / --dtype); returns the figures."""
    config = bench_config(config)
    mesh = sharding.make_mesh()
    s, batch_size = config.ssps, config.train.global_batch_size
    if batch_size % mesh.size:
        raise ValueError(f"global batch {batch_size} is not divisible by the {mesh.size} devices")
    warmup = max(1, warmup)  # the first call is never in the median

    model = methods.build_model(config, bn_axis_name=sharding.DATA)
    views, pos_dim = methods.positive_dim(config)
    pos_bytes = views * s.pos_queue_size * pos_dim * jnp.dtype(s.queue_dtype).itemsize // mesh.size
    n, k, why = kmeans_size(config, mesh, kmeans_n, kmeans_k, pos_bytes)
    per_epoch = n // batch_size
    if per_epoch < 2 * (warmup + steps):  # SSPS and plain steps take turns, both counting steps
        raise ValueError(
            f"N {n} is {per_epoch} steps of {batch_size}: the {2 * (warmup + steps)} steps timed must stay in "
            "the epoch that was clustered; raise --kmeans_n"
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
    if sizes.queue > n or (s.sampling != "knn" and k > n - n % batch_size):
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

    # The train state in the SSPS phase: full queues, step at the start of epoch start_epoch.
    tx, _ = methods.build_optimizer(config, per_epoch, config.train.epochs * per_epoch)
    state = init_train_state(model, tx, seed, methods.example_input(config), mesh, methods.teacher_outputs(config))
    replicated = sharding.replicated(mesh)
    start = s.start_epoch * per_epoch
    state = state.replace(
        ssps=full_queues(config, mesh, sizes, seed), step=jax.device_put(jnp.int32(start), replicated)
    )
    queue_bytes = sum(x.nbytes for x in (state.ssps.ref_index, state.ssps.ref_emb, state.ssps.pos_index))
    result["queue_mib_per_device"] = (queue_bytes + state.ssps.pos_emb.nbytes) / mesh.size / 2**20

    # One k-means run: the epoch's clustering, which also makes the steps below sample for real.
    if s.sampling != "knn":
        state, figures = _cluster_once(config, mesh, state, seed)
        result.update(figures)

    # The SSPS step, the plain step and the y^ forward alone, on the same state and batch, taking turns.
    batch = synthetic_batch(config, mesh, n, seed)
    specs = partition_specs(state)
    settings = method_settings(config, per_epoch, config.train.epochs * per_epoch)
    keys = [jax.device_put(jax.random.PRNGKey(seed + i), replicated) for i in range(warmup + steps)]
    ssps_fn = make_train_step(model, tx, mesh, settings, specs, ssps_step_settings(config, per_epoch))
    ssps_compiled, figures = _compile("ssps_step", ssps_fn, state, batch, keys[0])
    result.update(figures)
    plain_fn = make_train_step(model, tx, mesh, settings, specs)
    plain_compiled, figures = _compile("plain_step", plain_fn, state, batch, keys[0])
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

    first, times = _interleaved(
        {
            "ssps_step": step_call("ssps_step", ssps_compiled),
            "plain_step": step_call("plain_step", plain_compiled),
            "reference_embed": lambda: embed(variables(state), batch["reference"]),
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
    result["analytic_flops_per_device"] = analytic_step_flops(model, state, batch, config.method, True) / mesh.size

    # SSPS sampling + queue writes alone (bench/ssps.py's program), at the same sizes, in the clustered
    # epoch so that it samples; it takes the queues (donated): the train state is done with after this.
    y_ref = embed(variables(state), batch["reference"])
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
    result["mfu"] = flops / ssps_s / peak if flops and peak else None
    result["mfu_analytic"] = result["analytic_flops_per_device"] / ssps_s / peak if peak else None

    result["peak_memory_bytes"], result["peak_memory_kind"] = peak_memory()
    if baseline:
        result["baselines"] = run_baseline(baseline, config, k, steps, warmup, seed)
        result["comparisons"] = [compare(result, theirs) for theirs in result["baselines"]]
    return result


def _cluster_once(config: ml_collections.ConfigDict, mesh, state, seed: int):
    """(state with the clustering of epoch ssps.start_epoch, figures): one timed run of the training program."""
    s, replicated = config.ssps, sharding.replicated(mesh)
    cluster = make_cluster_fn(mesh, s.kmeans_iterations, s.inter_sampling_size, s.kmeans_chunk_elements)
    key = jax.device_put(jax.random.PRNGKey(seed), replicated)
    epoch = jax.device_put(jnp.int32(s.start_epoch), replicated)
    compiled, lower_s, compile_s = _lower_and_compile(cluster, state.ssps, key, epoch)
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


def run_baseline(
    name: str, config: ml_collections.ConfigDict, clusters: int, steps: int, warmup: int, seed: int
) -> list[dict]:
    """The reference implementation's figures, eager and compiled; a failed run is kept as its error.

    It samples among as many clusters as ours did (`clusters`), so the per-step SSPS work compares.
    """
    config = config.copy_and_resolve_references()
    config.ssps.kmeans_clusters = clusters
    if name != "torch":
        raise ValueError(f"unknown baseline {name!r}: only 'torch'")
    module = importlib.import_module("ssps_jax.bench.torch_baseline")
    out = []
    for compile_ in (False, True):
        try:
            theirs = module.run_benchmark(
                config=config,
                global_batch=config.train.global_batch_size,
                steps=steps,
                warmup=warmup,
                compile=compile_,
                ssps=True,
                seed=seed,
            )
        except Exception as e:  # one failed baseline must not lose our figures
            theirs = {"implementation": f"torch (compile={compile_})", "error": f"{type(e).__name__}: {e}"}
        out.append(dict(theirs, compile=compile_))
    return out


def compare(ours: dict, theirs: dict) -> dict:
    """Speed-ups of ours over a baseline: samples/s ours / theirs, SSPS sampling + queue time theirs / ours."""
    row = {"implementation": theirs.get("implementation", "baseline")}
    if "error" not in theirs:
        row["samples_per_s"] = ours["samples_per_s"] / theirs["samples_per_s"]
        if theirs.get("ssps_s_median"):
            row["ssps_time"] = theirs["ssps_s_median"] / ours["sampling_step_s"]
    return row


def _fmt(x, spec: str = ".3g", unit: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{unit}"


def table(r: dict) -> str:
    """The figures as a markdown table."""
    ms = 1e3
    rows = [
        ("devices", r["devices"]),
        (
            "model",
            f"{r['method']}, {r['encoder']} {r['channels'] or ''}, D {r['encoder_dim']}, {r['dtype']}; "
            f"global batch {r['global_batch']}",
        ),
        (
            "SSPS",
            f"{r['ssps_sampling']}, M {r['ssps_neighbours']}, Q' {r['ssps_queue']}, queues "
            f"{r['ssps_queue_dtype']} ({r['queue_mib_per_device']:.1f} MiB per device)",
        ),
        ("SSPS step compile (lower + compile)", f"{r['ssps_step_lower_s'] + r['ssps_step_compile_s']:.1f} s"),
        ("SSPS step, median", f"{ms * r['ssps_step_s']:.1f} ms"),
        ("samples/s", f"{r['samples_per_s']:.1f}"),
        ("coverage (anchors given a pseudo-positive)", f"{100 * r['coverage']:.1f}%"),
        ("plain step (no SSPS), median", f"{ms * r['plain_step_s']:.1f} ms"),
        (
            f"y^ forward ({r['crops']['reference_seconds']:g} s reference crop) alone",
            f"{ms * r['reference_embed_s']:.1f} ms",
        ),
        ("SSPS share of the step: (SSPS - plain) / SSPS, median of rounds", f"{100 * r['ssps_share_in_step']:.1f}%"),
        ("sampling + queues in the step: (SSPS - plain - y^) / SSPS", f"{100 * r['sampling_share_in_step']:.1f}%"),
        (
            "sampling + queues alone / SSPS step",
            f"{ms * r['sampling_step_s']:.2f} ms = {100 * r['sampling_share_isolated']:.2f}%",
        ),
    ]
    if "kmeans_s" in r:
        rows += [
            (
                f"k-means: N {r['ssps_n']}, K {r['ssps_k']}, D {r['ssps_dim']}, {r['ssps_iterations']} iterations",
                f"{r['kmeans_s']:.2f} s ({r['kmeans_iteration_s']:.3f} s per E+M step), "
                f"compile {r['kmeans_compile_s']:.1f} s",
            ),
            ("k-means size", r["kmeans_size_reason"]),
        ]
    rows += [
        (f"peak memory ({r['peak_memory_kind']})", f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"),
        (
            "FLOPs per step per device: counted (XLA) / analytic (conv + dense)",
            f"{_fmt(r['ssps_step_flops_per_device'], '.3e')} / {r['analytic_flops_per_device']:.3e} "
            f"(ratio {_fmt(r['counted_over_analytic'], '.2f')})",
        ),
        ("FLOP/s per device (counted)", _fmt(r["flops_per_s_per_device"], ".3e")),
        (
            "MFU: counted / analytic FLOPs",
            "n/a (no peak FLOP/s for this device)"
            if r["peak_flops_per_device"] is None
            else f"{_fmt(r['mfu'], '.1%')} / {_fmt(r['mfu_analytic'], '.1%')} "
            f"of {r['peak_flops_per_device'] / 1e12:.0f} TFLOP/s",
        ),
    ]
    for theirs, ratio in zip(r.get("baselines", []), r.get("comparisons", [])):
        name = theirs.get("implementation", "baseline")
        if "error" in theirs:
            rows.append((name, f"failed: {theirs['error']}"))
            continue
        ssps = theirs.get("ssps_s_median")
        rows += [
            (
                f"{name}: step, samples/s, SSPS",
                f"{ms * theirs['step_s_median']:.1f} ms, {theirs['samples_per_s']:.1f}, "
                f"{_fmt(ssps and ms * ssps, '.2f', ' ms')} ({theirs.get('device', '?')}, torch "
                f"{theirs.get('torch_version', '?')})",
            ),
            (
                f"ours vs {name}: samples/s ours/theirs, SSPS time theirs/ours",
                f"{ratio['samples_per_s']:.2f}x, {_fmt(ratio.get('ssps_time'), '.1f', 'x')}",
            ),
        ]
    return "\n".join(["| measure | value |", "| --- | --- |", *(f"| {a} | {b} |" for a, b in rows)])


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
) -> dict:
    """`ssps-jax bench`: runs, prints the table, writes the JSON."""
    config = bench_config(config, batch, dtype)
    result = run(
        config, steps=steps, warmup=warmup, kmeans_n=kmeans_n, kmeans_k=kmeans_k, baseline=baseline, seed=config.seed
    )
    if jax.process_index() == 0:
        print(table(result), flush=True)
        if json_path:
            Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
            print(f"written to {json_path}")
    return result
