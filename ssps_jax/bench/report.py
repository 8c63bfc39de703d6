"""The report of `ssps-jax bench`: its figures (bench/train.py's `run`) as a markdown table."""

from __future__ import annotations


def _fmt(x, spec: str = ".3g", unit: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{unit}"


def _mfu(r: dict) -> str:
    """The MFU reported, on the basis bench/flops.py's `mfu` chose, and the other figure beside it."""
    if r["peak_flops_per_device"] is None:
        return "n/a (no peak FLOP/s for this device)"
    peak = f"of {r['peak_flops_per_device'] / 1e12:.0f} TFLOP/s"
    if r["mfu_basis"] == "counted":
        analytic = _fmt(r["mfu_analytic"], ".1%")
        return f"{_fmt(r['mfu'], '.1%')} {peak} from XLA's FLOP count ({analytic} from the analytic one)"
    ratio = r["counted_over_analytic"]
    why = (
        "XLA's cost analysis counted no FLOPs"
        if ratio is None
        else f"XLA's cost analysis counted only {ratio:.0%} of them, too few to be the whole program: "
        "convolutions run as library custom calls (cuDNN on GPUs) that it does not count"
    )
    return f"{_fmt(r['mfu_analytic'], '.1%')} {peak}, from the analytic conv + dense FLOPs ({why})"


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
        ("MFU", _mfu(r)),
        ("bytes accessed per step per device (XLA)", _fmt(r.get("ssps_step_bytes_per_device"), ".3e")),
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
