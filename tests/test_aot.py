"""Ahead-of-time compilation for TPU slices on this CPU host (libtpu): what `ssps-jax compile` measures.

Two real TPU compiles of the tiny config's SSPS step and clustering (a
single-host v5e:2x2 and the 4-host v5e:4x4); everything else is checked
without compiling for a TPU, or on the CPU devices.
"""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import tiny_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipelines.errors import ConfigError
from ssps_jax import aot, cli, hardware, sharding
from ssps_jax.build import build

DEMO_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "demo_ssps.py")


def tiny_ssps_config(demo_dir, queue_dtype="float32"):
    c = tiny_config(demo_dir)
    c.ssps.enabled = True
    c.ssps.start_epoch = 1
    c.ssps.kmeans_clusters = 8
    c.ssps.pos_queue_size = 64
    c.ssps.queue_dtype = queue_dtype
    c.data.train_size = 200
    return c


def _queues(state):
    s = state.ssps
    return (s.ref_index, s.ref_emb, s.pos_index, s.pos_emb)


@pytest.fixture(scope="module", params=["v5e:2x2", "v5e:4x4"])
def compiled(request, demo_dir):
    config = tiny_ssps_config(demo_dir)
    report = aot.compile_config(config, request.param, programs=("ssps", "cluster"), bytes_by_op=3, say=lambda _: None)
    devices = aot.topology_devices(request.param)
    _, state = build(config, jax.sharding.Mesh(np.array(devices), (sharding.DATA,)), 200, abstract=True)
    return report, state


def test_a_pod_slice_spans_hosts_this_process_does_not_address():
    devices = aot.topology_devices("v5e:4x4")
    assert len(devices) == 16 and len({d.process_index for d in devices}) == 4
    assert devices[0].device_kind == "TPU v5 lite"
    assert aot.devices_per_chip("v5e:4x4", devices) == 1


def test_queues_are_split_evenly_over_the_slice(compiled):
    report, state = compiled
    step = next(p for p in report.programs if p.name == "SSPS step")
    for queue in _queues(state):
        assert aot.device_bytes(queue) * report.devices == aot.global_bytes(queue)
    assert step.arguments["ssps"] < aot.global_bytes(state.ssps)  # the queues are not replicated
    # XLA's figure is at least ours: the TPU pads small arrays to its memory tiles.
    assert sum(step.arguments.values()) <= step.argument_bytes


@pytest.fixture(scope="module")
def cpu_step(demo_dir):
    """The tiny config's SSPS step compiled for the 8 CPU devices, with its byte account."""
    run, state = build(tiny_ssps_config(demo_dir), sharding.make_mesh(), 200, abstract=True)
    (step,) = aot.compile_programs(run, state, ("ssps",), say=lambda _: None, bytes_by_op=3)
    return step


def test_the_argument_split_adds_up_to_what_xla_passes(cpu_step):
    """On the 8 CPU devices (no tile padding): our per-part bytes of the step are XLA's argument bytes exactly.
    (The clustering reads only some of the SSPS state, and jit leaves unread arguments out.)"""
    assert sum(cpu_step.arguments.values()) == cpu_step.argument_bytes


def _check_account(step, low, high):
    account = step.bytes_account
    assert low <= account["total"] / step.bytes_accessed <= high  # our sum of the ops against XLA's total
    assert sum(p["total"] for p in account["by_part"].values()) == account["total"]
    assert 0 < account["hbm"] <= account["total"]  # on a TPU, much of it is on-chip VMEM
    assert len(account["top_ops"]) == 3 and account["top_ops"][0]["bytes"] >= account["top_ops"][-1]["bytes"]
    parts = account["by_part"]
    for part, passes in [("front end", ("forward", "inference")), ("blocks_1", ("forward", "backward"))]:
        assert all(parts[part].get(p, 0) > 0 for p in passes), part
    assert parts["optimizer"].get("step", 0) > 0 and parts["SSPS"].get("step", 0) > 0
    assert parts["parameters' gather"].get("step", 0) > 0  # the split kernels, whole for the model
    assert parts["BatchNorm"].get("backward", 0) > 0 and parts["asp"].get("inference", 0) > 0


def test_byte_account_of_the_cpu_step_is_xlas_total_split_by_model_part(cpu_step):
    _check_account(cpu_step, 0.98, 1.02)  # the CPU's HLO: no memory tiles, no asynchronous copies
    assert cpu_step.bytes_account["hbm"] == cpu_step.bytes_account["total"]  # no on-chip memory space


def test_byte_account_of_the_tpu_step_is_near_xlas_total(compiled):
    """XLA:TPU's cost analysis has conventions of its own for asynchronous ops: the account is within 20%.

    106-118% of XLA's total on the paper's configs (docs/performance.md); 85% on v5e:4x4 for the suite's
    one-block ECAPA-TDNN (where that difference lies was not investigated)."""
    report, _ = compiled
    _check_account(next(p for p in report.programs if p.name == "SSPS step"), 0.8, 1.2)


def test_step_gathers_negatives_and_averages_gradients_but_never_gathers_a_queue(compiled):
    report, _ = compiled
    step = next(p for p in report.programs if p.name == "SSPS step")
    assert step.collectives["all-gather"]["count"] >= 1  # NT-Xent's negatives from every device
    assert step.collectives["all-reduce"]["count"] >= 1  # gradients (and synchronised BatchNorm)
    assert step.queue_all_gathers == 0
    assert step.flops > 0 and step.bytes_accessed > 0
    assert report.hbm_bytes == 16 * 2**30 and step.peak_bytes < report.hbm_bytes


def test_bfloat16_queues_halve_the_queue_memory(demo_dir):
    devices = aot.topology_devices("v5e:2x2")
    mesh = jax.sharding.Mesh(np.array(devices), (sharding.DATA,))
    sizes = {}
    for dtype in ("float32", "bfloat16"):
        _, state = build(tiny_ssps_config(demo_dir, dtype), mesh, 200, abstract=True)
        sizes[dtype] = aot.device_bytes((state.ssps.ref_emb, state.ssps.pos_emb))
    assert sizes["bfloat16"] * 2 == sizes["float32"]


def test_collectives_are_read_from_the_hlo_with_their_sizes():
    """On the CPU devices: a program that all-gathers a (16, 8) float32 queue and psums a scalar."""
    mesh = sharding.make_mesh(jax.devices()[:4])

    def per_device(queue):
        return jax.lax.all_gather(queue, sharding.DATA, tiled=True), jax.lax.psum(queue.sum(), sharding.DATA)

    fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P(sharding.DATA), out_specs=(P(), P()), check_vma=False))
    queue = jax.ShapeDtypeStruct((16, 8), np.float32, sharding=NamedSharding(mesh, P(sharding.DATA)))
    found = aot.collectives(fn.lower(queue).compile().as_text())
    gathers = [c for c in found if c.op == "all-gather"]
    assert [c.bytes for c in gathers] == [16 * 8 * 4]  # the whole queue on every device
    assert [c.shapes for c in gathers] == [((16, 8),)]  # what the reports match against the queues' shapes
    assert any(c.op == "all-reduce" and c.bytes == 4 for c in found)


def test_a_config_the_slice_cannot_run_is_refused_with_the_key(demo_dir):
    config = tiny_ssps_config(demo_dir)
    config.train.global_batch_size = 12  # 16 devices on a v5e:4x4
    with pytest.raises(ConfigError, match=r"config.train.global_batch_size: 12 is not divisible by the 16 devices"):
        aot.compile_config(config, "v5e:4x4", say=lambda _: None)
    config = tiny_ssps_config(demo_dir)
    config.data.train_size = 0
    with pytest.raises(ConfigError, match=r"config\.data\.train_size"):
        aot.compile_config(config, "v5e:2x2", say=lambda _: None)


def test_whole_run_roofline_counts_plain_and_ssps_epochs_and_one_clustering_per_ssps_epoch():
    def program(name, flops):
        return aot.ProgramReport(name, {}, 0, 0, 0, 0, 0, flops, 0.0, {}, 0, 0.0, 1)

    report = aot.Report(
        topology="v5e:2x2",
        device_kind="TPU v5 lite",
        devices=4,
        processes=1,
        devices_per_chip=1,
        hbm_bytes=1.0,
        hbm_bytes_per_s=1.0,
        peak_flops=1.0,  # roofline seconds = FLOPs
        config={"steps_per_epoch": 10, "epochs": 5, "ssps": {"start_epoch": 3, "sampling": "kmeans-repr"}},
        programs=[program("plain step", 1.0), program("SSPS step", 2.0), program("clustering", 7.0)],
    )
    # Epochs 0-1 plain (20 steps), 2-4 with the queues (30 steps), clustering at the start of epochs 3 and 4.
    assert aot.run_roofline_seconds(report) == 20 * 1.0 + 30 * 2.0 + 2 * 7.0
    for unclustered in ("knn", "oracle"):  # no k-means to count
        config = {**report.config, "ssps": {"start_epoch": 3, "sampling": unclustered}}
        assert aot.run_roofline_seconds(dataclasses.replace(report, config=config)) == 20 * 1.0 + 30 * 2.0


def test_compile_command_prints_the_per_device_table(tmp_path, capsys):
    """The demo config through the CLI (its clustering only: the step programs are compiled above)."""
    out = tmp_path / "demo.json"
    args = ["--topology", "v5e:2x2", "--programs", "cluster", "--json", str(out)]
    cli.main(["compile", "--config", DEMO_CONFIG, *args])
    printed = capsys.readouterr().out
    assert "| per device | clustering |" in printed and "peak vs HBM 16 GiB" in printed
    figures = json.loads(out.read_text())
    assert figures["config"]["dataset_size"] == 1080 and figures["programs"][0]["fits"]


def test_libtpu_installed_for_compiling_does_not_make_this_host_a_tpu_vm(monkeypatch):
    """`make test` installs libtpu; training here must still run as one process (no jax.distributed)."""
    import importlib.util

    from ssps_jax import distributed

    assert importlib.util.find_spec("libtpu") is not None
    for key in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: pytest.fail("joined a multi-process runtime"))
    assert not distributed.initialize()
    monkeypatch.setattr(hardware.glob, "glob", lambda pattern: ["/dev/accel0"] if "accel" in pattern else [])
    assert hardware.tpu_chips_attached()
