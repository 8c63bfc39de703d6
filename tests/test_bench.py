"""`ssps-jax bench` and `bench-input`: what they count and report; never how fast (no timing assertions)."""

import json
import os
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ssps_jax import hardware, sharding
from ssps_jax.bench import baseline, flops, report, sizing, timing
from ssps_jax.bench import input as bench_input
from ssps_jax.bench import train as bench
from ssps_jax.config import base_config

B, T, C, CONV, DENSE, WINDOW = 16, 34, 32, 64, 32, 3


class ConvDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(DENSE)(nn.Conv(CONV, (WINDOW,), padding="VALID")(x))


def _loss(params, x):
    return jnp.mean(ConvDense().apply({"params": params}, x) ** 2)


def _hand_count(batch: int) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of the conv and dense layers: 2 per multiply-add."""
    positions = batch * (T - WINDOW + 1)
    conv, dense = 2 * positions * WINDOW * C * CONV, 2 * positions * CONV * DENSE
    # Backward: each layer's weight gradient costs its forward; the input gradient is needed for the
    # dense layer only (the conv's input is data, and XLA drops what nothing uses).
    return conv + dense, 2 * conv + 3 * dense


def test_counted_flops_equal_the_hand_count():
    x = jnp.ones((B, T, C))
    params = ConvDense().init(jax.random.PRNGKey(0), x)["params"]
    forward, step = _hand_count(B)
    assert flops.matmul_flops(lambda p, x: ConvDense().apply({"params": p}, x), params, x) == forward

    counted = flops.counted_flops(jax.jit(jax.grad(_loss)).lower(params, x).compile())
    # XLA also counts the elementwise work (bias adds, square, mean and their gradients): about
    # 10 FLOPs per activation against 2 x 96 (conv) or 2 x 64 (dense) per output element: 1% here.
    assert 1.0 <= counted / step < 1.05

    # A shard_map program is counted per device: a batch split 8 ways is an eighth of the work.
    mesh = sharding.make_mesh()

    def per_device(p, x):
        return jax.lax.pmean(jax.grad(_loss)(p, x), sharding.DATA)

    sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(sharding.DATA)), out_specs=P()))
    counted = flops.counted_flops(sharded.lower(params, x).compile())
    assert 1.0 <= counted / (step / mesh.size) < 1.05


def test_peak_flops_table():
    assert hardware.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert hardware.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert hardware.peak_flops("NVIDIA H100 80GB HBM3", "float32") == 495e12  # TF32: JAX's default precision
    assert hardware.peak_flops("TPU v5 lite", "bfloat16") == 197e12
    assert hardware.peak_flops("cpu", "float32") is None


def test_kmeans_size_on_cpu_is_the_sslsv_comparison_point_and_says_why():
    config, mesh = base_config(), sharding.make_mesh()
    n, k, why = sizing.kmeans_size(config, mesh, None, None, pos_bytes=0)
    assert (n, k) == (sizing.CPU_N, sizing.CPU_K) and "CPU" in why
    assert sizing.kmeans_size(config, mesh, 1000, 10, pos_bytes=0) == (1000, 10, "as asked (--kmeans-n, --kmeans-k)")


def tiny_bench_config():
    """A SimCLR-SSPS config that compiles in seconds: one SE-Res2Net block of 16 channels, 0.5 s crops."""
    c = base_config()
    c.model.mel.n_mels = 16
    c.model.encoder_dim = 16
    e = c.model.ecapa_tdnn
    e.channels, e.kernel_sizes, e.dilations = (16, 16, 48), (5, 3, 1), (1, 2, 1)
    e.res2net_scale, e.attention_channels, e.se_channels = 2, 8, 8
    c.data.crops.frame_seconds = 0.5
    c.data.crops.reference_seconds = 1.0
    c.train.global_batch_size = 16
    c.ssps.kmeans_clusters = 24
    c.ssps.pos_queue_size = 96
    return c


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    result = bench.main(
        tiny_bench_config(),
        steps=2,
        warmup=1,
        batch=None,
        dtype=None,
        kmeans_n=480,
        kmeans_k=24,
        json_path=str(path),
        baseline=None,
    )
    return result, json.loads(path.read_text())


def test_bench_runs_sharded_and_really_samples(bench_result):
    result, _ = bench_result
    assert result["device_count"] == 8
    assert result["coverage"] > 0  # the timed SSPS steps replaced positives
    assert result["sampling_coverage"] > 0
    assert result["loss_finite"]
    assert (result["ssps_n"], result["ssps_k"]) == (480, 24) and "as asked" in result["kmeans_size_reason"]
    assert result["kmeans_s"] > 0
    assert result["peak_memory_kind"].startswith("host peak RSS")  # the CPU has no device memory statistics
    assert result["mfu"] is None and result["flops_per_s_per_device"] > 0
    # XLA counts at least the conv and dense work (here much more: the mel front end of a tiny model).
    assert result["counted_over_analytic"] > 1


def test_bench_json_is_the_result(bench_result):
    result, written = bench_result
    assert written == json.loads(json.dumps(result))
    assert written["samples_per_s"] == pytest.approx(written["global_batch"] / written["ssps_step_s"])
    # Medians over rounds of per-round shares; each round's sampling share is its SSPS share less y^'s.
    assert written["sampling_share_in_step"] <= written["ssps_share_in_step"]
    assert written["sampling_share_isolated"] == pytest.approx(written["sampling_step_s"] / written["ssps_step_s"])


def test_baseline_interface_and_ratios(monkeypatch, bench_result):
    calls = []

    def run_benchmark(*, config, global_batch, steps, warmup, compile, ssps, seed):
        calls.append((config.ssps.kmeans_clusters, global_batch, steps, warmup, compile, ssps, seed))
        if compile:
            raise RuntimeError("no compiler here")
        return {"implementation": "torch", "step_s_median": 2.0, "samples_per_s": 8.0, "ssps_s_median": 0.5}

    fake = types.ModuleType("ssps_jax.bench.torch_baseline")
    fake.run_benchmark = run_benchmark
    monkeypatch.setitem(sys.modules, "ssps_jax.bench.torch_baseline", fake)
    theirs = baseline.run_baseline("torch", tiny_bench_config(), clusters=24, steps=2, warmup=1, seed=0)
    assert calls == [(24, 16, 2, 1, False, True, 0), (24, 16, 2, 1, True, True, 0)]
    assert "error" in theirs[1] and "no compiler here" in theirs[1]["error"]

    ours = {"samples_per_s": 32.0, "sampling_step_s": 0.01}
    assert baseline.compare(ours, theirs[0]) == {"implementation": "torch", "samples_per_s": 4.0, "ssps_time": 50.0}
    result = dict(bench_result[0], baselines=theirs, comparisons=[baseline.compare(ours, t) for t in theirs])
    assert "4.00x, 50.0x" in report.table(result) and "failed: RuntimeError" in report.table(result)


def test_bench_input_counts_examples_per_second():
    config = base_config()
    config.data.augment.enabled = False
    config.data.crops.frame_seconds = 0.25
    config.data.crops.reference_seconds = 0.5
    rng = np.random.default_rng(0)
    source = [{"audio": rng.integers(-3000, 3000, 8000, dtype=np.int16), "index": i} for i in range(32)]
    examples = {}
    for on in ("host", "device"):
        config.data.augment.on = on
        examples[on] = bench_input.input_pipeline.make_examples(config.data)
    rows = [
        {"on": on, **bench_input.measure(source, ex, batch_size=8, workers=0, batches=3, prefetch=2, seed=0)}
        for on, ex in examples.items()
    ]
    row = rows[0]
    assert row["workers"] == 0 and row["batches"] == 3
    assert row["examples_per_s"] == pytest.approx(3 * 8 / row["seconds"])
    costs = bench_input.example_costs(source, examples, records=4)
    assert costs["records"] == 4 and {"read_ms", "host_map_ms", "device_map_ms"} <= set(costs)
    result = {
        "cpus": 2,
        "train_csv": "x.csv",
        "records": 32,
        "batch": 8,
        "crops": config.data.crops.to_dict(),
        "augment": "off",
        "device_samples_per_s": 1e9,
        "rows": rows,
        "costs": costs,
    }
    table = bench_input.table(result)
    assert "| host | 0 |" in table and "| device | 0 |" in table and "no (" in table
    # The per-example breakdown adds up to the in-process rate.
    assert all(r["cpu_ms_per_example"] > 0 for r in rows)  # in process: its CPU time is counted
    rest = [r["cpu_ms_per_example"] - costs["read_ms"] - costs[f"{r['on']}_map_ms"] for r in rows]
    assert f"| the rest: grain, batching (the total - the above) | {rest[0]:.3f} | {rest[1]:.3f} |" in table


class _FakeCompiled:
    """A compiled program whose cost analysis says what a GPU's did (cuDNN convolutions not counted)."""

    def cost_analysis(self):
        return [{"flops": 1.464e11, "bytes accessed": 2.0e10}]  # older jax: a list of one dict


def test_mfu_is_analytic_where_xlas_count_is_implausible(bench_result):
    counted = flops.counted_flops(_FakeCompiled())
    assert counted == 1.464e11 and flops.counted_flops(_FakeCompiled(), "bytes accessed") == 2.0e10
    # The H200 bf16 run of 2026-12-04: 1.527e13 analytic FLOPs per step, 83.4 ms, 989 TFLOP/s.
    figures = flops.mfu(counted, 1.527e13, 0.0834, 989e12)
    assert figures["mfu_basis"] == "analytic"
    assert figures["mfu_reported"] == figures["mfu_analytic"] == pytest.approx(0.185, abs=0.001)
    assert figures["mfu"] == pytest.approx(0.0018, abs=0.0001)
    result = dict(bench_result[0], **figures, peak_flops_per_device=989e12, counted_over_analytic=counted / 1.527e13)
    row = next(line for line in report.table(result).splitlines() if line.startswith("| MFU |"))
    assert "18.5% of 989 TFLOP/s, from the analytic" in row and "only 1% of them" in row and "cuDNN" in row
    # A plausible count (a TPU's, or the CPU's: everything is an HLO op) is the one reported.
    plausible = flops.mfu(1.6e13, 1.527e13, 0.0834, 989e12)
    assert plausible["mfu_basis"] == "counted" and plausible["mfu_reported"] == plausible["mfu"]
    result.update(plausible)
    row = next(line for line in report.table(result).splitlines() if line.startswith("| MFU |"))
    assert row.startswith("| MFU | 19.4% of 989 TFLOP/s from XLA's FLOP count (18.5% from the analytic one)")


def test_xla_messages_go_to_a_file_not_the_screen(tmp_path, capfd):
    log = tmp_path / "xla.log"
    with timing.messages_to(str(log)) as messages:
        os.write(2, b"W hlo_rematerialization.cc] Can't reduce memory use below 9 GiB\nW bfc_allocator.cc] retry\n")
    os.write(2, b"after\n")
    assert messages["lines"] == 2 and "rematerialization" in log.read_text()
    assert capfd.readouterr().err == "after\n"


def test_bench_reports_the_bytes_of_its_step(bench_result):
    result, _ = bench_result
    assert result["ssps_step_bytes_per_device"] > 0
    assert "| bytes accessed per step per device (XLA) |" in report.table(result)
