"""Ahead-of-time compilation of a run's programs for a TPU slice, on any host (`ssps-jax compile`).

libtpu compiles for a TPU topology it is not running on:
`jax.experimental.topologies.get_topology_desc` gives the devices of a slice
(of every host of it: a v5e:16x16 spans 64 hosts), a mesh over them is an
ordinary `Mesh`, and `jit(f).lower(<ShapeDtypeStructs with shardings on that
mesh>).compile()` returns the TPU executable. Nothing touches device memory.

What is compiled is what training runs, built the same way (`build(...,
abstract=True)`): the plain step, the SSPS step, the epoch-start clustering
at the config's dataset size, and the evaluation embedding program of each
length bucket. Per program and per device the report gives

  arguments   split into parameters (with BatchNorm statistics and the
              method's state, e.g. DINO's teacher), optimizer state, SSPS
              state, batch and the rest, from the arguments' shardings
              (logical bytes: XLA's total is higher on a TPU, which pads
              small arrays to its memory tiles, and lower for a program
              that leaves arguments unread, which jit drops);
  memory      XLA's own figures (`memory_analysis`): arguments, outputs,
              temporaries; peak = arguments + outputs - aliased (the donated
              state) + temporaries + code, against the device's HBM;
  work        FLOPs and bytes accessed (`cost_analysis`, the partitioned
              per-device program), and the roofline time
              max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) with the
              samples/s it implies (cost_analysis's own "optimal_seconds"
              comes out negative on libtpu 0.0.42: not used);
  collectives every all-gather, all-reduce, reduce-scatter, all-to-all and
              collective-permute of the optimised HLO (count, bytes), and
              the check that no SSPS queue is all-gathered;
  bytes       with `bytes_by_op` (`--bytes-by-op N`), where the bytes
              accessed go: by part of the model and pass, and the N ops that
              move the most, each named by the Flax module that made it
              (ssps_jax/bench/hlo_bytes.py; docs/performance.md).
A v4 chip shows as two devices (one a TensorCore): HBM, bandwidth and peak
are split between them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections import Counter

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipelines import input_pipeline
from data_pipelines.errors import ConfigError
from ssps_jax import config as config_lib
from ssps_jax import hardware, sharding
from ssps_jax.bench import hlo_bytes
from ssps_jax.build import Run, build
from ssps_jax.evaluation.embedding import Embedder, bucket_lengths
from ssps_jax.evaluation.verification import embed_fn
from ssps_jax.ssps import sampling

PROGRAMS = ("plain", "ssps", "cluster", "embed")
ARGUMENT_PARTS = ("parameters", "optimizer", "ssps", "batch", "other")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# `%x = f32[8,16]{1,0} all-gather(...)`, or `(..., ...) all-gather-start(...)` when asynchronous.
_HLO_OP = re.compile(r"=\s*(?P<type>.+?)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\(")
_HLO_ARRAY = re.compile(r"\b(?P<dtype>pred|[sufc]\d+|bf16)\[(?P<dims>[\d,]*)\]")
_DTYPE_BYTES = {"pred": 1, "bf16": 2}


def topology_devices(name: str) -> list:
    """Every device of the TPU slice `name` (e.g. "v5e:4x4"), across all its hosts."""
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except ImportError as e:
        raise ConfigError(f"--topology {name}: libtpu is not installed (pip install -e '.[tpu]')") from e
    except Exception as e:  # libtpu's own message is a screen long; its first line says enough
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--topology {name!r}: libtpu cannot make this topology: {first}") from e


def devices_per_chip(name: str, devices: list) -> int:
    """Devices per chip: the topology name counts chips (v4:2x2x2 is 8 chips of 2 TensorCores each)."""
    chips = math.prod(int(x) for x in name.split(":")[1].split("x"))
    return max(1, len(devices) // chips)


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str
    bytes: int  # of its result, on one device
    shapes: tuple[tuple[int, ...], ...] = ()  # of its result's arrays


def collectives(hlo: str) -> list[Collective]:
    """The collectives of an optimised HLO module (its text), with their result sizes."""
    found = []
    for m in _HLO_OP.finditer(hlo):
        arrays = list(_HLO_ARRAY.finditer(m["type"]))
        if m["start"] and m["op"] in ("all-gather", "collective-permute") and len(arrays) > 1:
            arrays = arrays[len(arrays) // 2 :]  # (operands, results) of the asynchronous start
        shapes = tuple(tuple(int(d) for d in a["dims"].split(",") if d) for a in arrays)
        found.append(Collective(m["op"], sum(_array_bytes(a) for a in arrays), shapes))
    return found


def _array_bytes(m: re.Match) -> int:
    dtype = m["dtype"]
    size = _DTYPE_BYTES.get(dtype) or int(dtype[1:]) // 8
    return size * math.prod(int(d) for d in m["dims"].split(",") if d)


def device_bytes(tree) -> int:
    """Bytes of one device's shards of the abstract arrays of `tree`."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def global_bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class ProgramReport:
    """One compiled program's figures, per device."""

    name: str
    arguments: dict[str, int]  # by part, from the arguments' shapes and shardings (logical bytes)
    argument_bytes: int  # XLA's: on a TPU, with arrays padded to its memory tiles
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float
    bytes_accessed: float
    collectives: dict[str, dict[str, int]]  # op -> {"count", "bytes"}
    queue_all_gathers: int  # all-gathers of a whole SSPS queue (a queue's global shape): must be 0
    compile_seconds: float
    samples: int  # examples one call processes (global batch), 0 for the clustering
    bytes_account: dict | None = None  # hlo_bytes.summary: bytes by part and pass, the largest ops

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    def roofline_seconds(self, peak_flops: float, hbm_bytes_per_s: float) -> float:
        return max(self.flops / peak_flops, self.bytes_accessed / hbm_bytes_per_s)


@dataclasses.dataclass
class Report:
    topology: str
    device_kind: str
    devices: int
    processes: int
    devices_per_chip: int
    hbm_bytes: float  # per device
    hbm_bytes_per_s: float  # per device
    peak_flops: float  # per device
    config: dict  # what was compiled: method, encoder, dtype, batch, dataset size, SSPS sizes
    programs: list[ProgramReport]

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for p, d in zip(self.programs, out["programs"]):
            d["peak_bytes"] = p.peak_bytes
            d["fits"] = p.peak_bytes <= self.hbm_bytes
            d["roofline_seconds"] = p.roofline_seconds(self.peak_flops, self.hbm_bytes_per_s)
        out["run_roofline_seconds"] = run_roofline_seconds(self)
        return out


def compile_config(
    config: ml_collections.ConfigDict,
    topology: str,
    *,
    dataset_size: int | None = None,
    programs: tuple[str, ...] = PROGRAMS,
    eval_seconds: float = 20.0,
    bytes_by_op: int = 0,
    say=print,
) -> Report:
    """Builds `config`'s run on the slice `topology` with abstract arrays and compiles `programs` for it."""
    devices = topology_devices(topology)
    mesh = Mesh(np.array(devices), (sharding.DATA,))
    config_lib.validate(config, device_count=len(devices), data_on_disk=False)
    size = dataset_size or config.data.train_size
    if not size:
        raise ConfigError("config.data.train_size: 0 (unknown): set it, or pass --dataset-size")
    if unknown := sorted(set(programs) - set(PROGRAMS)):
        raise ConfigError(f"--programs: unknown {unknown}; choose among {PROGRAMS}")
    run, state = build(config, mesh, size, abstract=True)
    kind = devices[0].device_kind
    per_chip = devices_per_chip(topology, devices)
    chip = hardware.tpu_chip(kind)
    say(
        f"{topology}: {len(devices)} devices ({kind}, {per_chip} per chip) on "
        f"{len({d.process_index for d in devices})} hosts; {config.method}, {config.model.encoder}, "
        f"{config.model.dtype}, global batch {config.train.global_batch_size}, {size} utterances"
    )
    reports = compile_programs(run, state, programs, eval_seconds, say, bytes_by_op)
    return Report(
        topology=topology,
        device_kind=kind,
        devices=len(devices),
        processes=len({d.process_index for d in devices}),
        devices_per_chip=per_chip,
        hbm_bytes=chip.hbm_bytes / per_chip,
        hbm_bytes_per_s=chip.hbm_bytes_per_s / per_chip,
        peak_flops=hardware.peak_flops(kind, config.model.dtype) / per_chip,
        config=_described(config, size, run),
        programs=reports,
    )


def compile_programs(
    run: Run, state, programs=PROGRAMS, eval_seconds: float = 20.0, say=print, bytes_by_op: int = 0
) -> list:
    """Lowers and compiles the `programs` of `run` on its mesh with the abstract `state`: one ProgramReport each.

    With `bytes_by_op` > 0 each program's byte account is printed (that many ops) and kept in its report.
    """
    reports = []
    for name, fn, args, parts, samples in _programs(run, state, programs, eval_seconds):
        started = time.perf_counter()
        compiled = fn.lower(*args).compile()
        seconds = time.perf_counter() - started
        report = _program_report(name, compiled, parts, state, seconds, samples)
        say(f"  compiled {name} in {seconds:.0f} s")
        if bytes_by_op > 0:
            ops = hlo_bytes.account(compiled.as_text())
            report.bytes_account = hlo_bytes.summary(ops, bytes_by_op)
            say(f"\n{name}: " + hlo_bytes.render(report.bytes_account, report.bytes_accessed) + "\n")
        reports.append(report)
    return reports


def _programs(run: Run, state, programs, eval_seconds: float):
    """(name, jitted fn, abstract args, {part: args subtree}, samples) of every program asked for."""
    mesh, config = run.mesh, run.config
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(sharding.DATA))
    batch = {
        name: jax.ShapeDtypeStruct(shape, dtype, sharding=split)
        for name, (shape, dtype) in input_pipeline.batch_shapes(config.data, config.train.global_batch_size).items()
    }
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
    parts = {
        "parameters": (state.params, state.batch_stats, state.method_state),
        "optimizer": state.opt_state,
        "ssps": state.ssps,
        "batch": batch,
        "other": (state.step, state.rng, key),
    }
    samples = config.train.global_batch_size
    if "plain" in programs:  # given the whole batch, as in training (the input pipeline always has the reference)
        yield "plain step", run.plain_step, (state, batch, key), parts, samples
    if "ssps" in programs and run.ssps_step is not None:
        yield "SSPS step", run.ssps_step, (state, batch, key), parts, samples
    if "cluster" in programs and run.ssps.enabled and run.ssps.clustered:
        epoch = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
        args = (state.ssps, key, epoch)
        yield "clustering", run.ssps.cluster_program(), args, {"ssps": state.ssps, "other": (key, epoch)}, 0
    if "embed" in programs:
        embedder = Embedder(
            embed_fn(run.model),
            mesh,
            config.eval.batch_size,
            bucket_ratio=config.eval.bucket_ratio,
            min_bucket=round(config.eval.min_bucket_seconds * 16000),
        )
        variables = run.eval_variables(state)
        b = embedder.batch_size
        lengths = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=split)
        for length in bucket_lengths(round(eval_seconds * 16000), embedder.min_bucket, embedder.bucket_ratio):
            wave = jax.ShapeDtypeStruct((b, length), jnp.float32, sharding=split)
            args = (variables, wave, lengths)
            parts_ = {"parameters": variables, "batch": (wave, lengths)}
            yield f"embed {length / 16000:.1f} s", embedder.program, args, parts_, b


def _program_report(name: str, compiled, parts: dict, state, seconds: float, samples: int) -> ProgramReport:
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    found = collectives(compiled.as_text())
    summary = {
        op: {"count": n, "bytes": sum(c.bytes for c in found if c.op == op)}
        for op, n in Counter(c.op for c in found).items()
    }
    # A queue gathered whole is an all-gather with a queue's global shape among its results (the parameters'
    # all-gathers of update_sharding.py can be as large as a small config's queues).
    queues = set() if state.ssps is None else {tuple(state.ssps.ref_emb.shape), tuple(state.ssps.pos_emb.shape)}
    return ProgramReport(
        name=name,
        arguments={part: device_bytes(tree) for part, tree in parts.items() if jax.tree.leaves(tree)},
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        code_bytes=memory.generated_code_size_in_bytes,
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        collectives=summary,
        queue_all_gathers=sum(1 for c in found if c.op == "all-gather" and queues & set(c.shapes)),
        compile_seconds=seconds,
        samples=samples,
    )


def _described(config: ml_collections.ConfigDict, size: int, run: Run) -> dict:
    s = config.ssps
    return {
        "method": config.method,
        "encoder": config.model.encoder,
        "dtype": config.model.dtype,
        "global_batch": config.train.global_batch_size,
        "dataset_size": size,
        "steps_per_epoch": run.steps_per_epoch,
        "epochs": config.train.epochs,
        "ssps": None
        if not s.enabled
        else {
            "start_epoch": s.start_epoch,
            "sampling": s.sampling,
            "kmeans_clusters": s.kmeans_clusters,
            "pos_queue_size": s.pos_queue_size,
            "queue_dtype": s.queue_dtype,
        },
    }


def run_roofline_seconds(report: Report) -> float | None:
    """Roofline time of the whole run: plain steps, SSPS steps and one clustering per SSPS epoch
    (evaluation left out); None unless every program it needs was compiled."""
    c = report.config
    by_name = {p.name: p.roofline_seconds(report.peak_flops, report.hbm_bytes_per_s) for p in report.programs}
    per_epoch, epochs = c["steps_per_epoch"], c["epochs"]
    if c["ssps"] is None:
        return by_name["plain step"] * per_epoch * epochs if "plain step" in by_name else None
    start = c["ssps"]["start_epoch"]
    clustered = sampling.get(c["ssps"]["sampling"]).clustered
    needed = ["plain step", "SSPS step"] + (["clustering"] if clustered else [])
    if any(n not in by_name for n in needed):
        return None
    plain_epochs = max(0, start - 1)
    total = by_name["plain step"] * per_epoch * plain_epochs + by_name["SSPS step"] * per_epoch * (
        epochs - plain_epochs
    )
    return total + (by_name["clustering"] * max(0, epochs - start) if clustered else 0.0)


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds:.1f} s"


def table(report: Report) -> str:
    """The report as a markdown table, one column per program."""
    gib = 2**30
    r = report
    head = ["per device", *(p.name for p in r.programs)]

    def row(label, fn):
        return [label, *(fn(p) for p in r.programs)]

    parts = sorted(
        {k for p in r.programs for k in p.arguments}, key=["parameters", "optimizer", "ssps", "batch", "other"].index
    )
    rows = [row(f"arguments: {k}", lambda p, k=k: _size(p.arguments.get(k, 0))) for k in parts]
    rows += [
        row("arguments, XLA", lambda p: _size(p.argument_bytes)),
        row("outputs, of which aliased", lambda p: f"{_size(p.output_bytes)}, {_size(p.alias_bytes)}"),
        row("temporaries", lambda p: _size(p.temp_bytes)),
        row(
            f"peak vs HBM {r.hbm_bytes / gib:.0f} GiB",
            lambda p: f"{_size(p.peak_bytes)} ({'fits' if p.peak_bytes <= r.hbm_bytes else 'DOES NOT FIT'})",
        ),
        row("FLOPs", lambda p: f"{p.flops:.3g}"),
        row("bytes accessed", lambda p: f"{p.bytes_accessed:.3g}"),
        row(
            "roofline (ms)",
            lambda p: (
                f"{1e3 * p.roofline_seconds(r.peak_flops, r.hbm_bytes_per_s):.2f}"
                f" ({'compute' if p.flops / r.peak_flops >= p.bytes_accessed / r.hbm_bytes_per_s else 'memory'})"
            ),
        ),
        row(
            "samples/s at the roofline",
            lambda p: f"{p.samples / p.roofline_seconds(r.peak_flops, r.hbm_bytes_per_s):,.0f}" if p.samples else "-",
        ),
    ]
    for op in COLLECTIVES:
        if any(op in p.collectives for p in r.programs):
            rows.append(
                row(
                    f"{op}: count, MiB",
                    lambda p, op=op: (
                        f"{p.collectives.get(op, {}).get('count', 0)}, "
                        f"{p.collectives.get(op, {}).get('bytes', 0) / 2**20:.2f}"
                    ),
                )
            )
    rows += [
        row("queue-sized all-gathers", lambda p: str(p.queue_all_gathers)),
        row("compile on this host (s)", lambda p: f"{p.compile_seconds:.0f}"),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    if (total := run_roofline_seconds(r)) is not None:
        c = r.config
        lines.append(
            f"\nWhole run at the roofline: {_duration(total)} ({c['epochs']} epochs x {c['steps_per_epoch']} steps"
            f"{', SSPS from epoch ' + str(c['ssps']['start_epoch']) if c['ssps'] else ''}; evaluation not counted)"
        )
    return "\n".join(lines)


def main(
    config: ml_collections.ConfigDict,
    topology: str,
    *,
    batch: int | None,
    dtype: str | None,
    programs: tuple[str, ...],
    dataset_size: int | None,
    eval_seconds: float,
    json_path: str | None,
    bytes_by_op: int = 0,
) -> Report:
    """`ssps-jax compile`: compiles, prints the table (and the byte accounts), writes the JSON."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        if batch:
            config.train.global_batch_size = batch
        if dtype:
            config.model.dtype = dtype
    report = compile_config(
        config,
        topology,
        dataset_size=dataset_size,
        programs=programs,
        eval_seconds=eval_seconds,
        bytes_by_op=bytes_by_op,
    )
    print(table(report), flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report.as_dict(), f, indent=2)
            f.write("\n")
        print(f"written to {json_path}")
    return report
