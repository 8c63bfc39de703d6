"""The PyTorch comparison of `ssps-jax bench`.

`--baseline torch` runs the PyTorch reference step
(`ssps_jax.bench.torch_baseline.run_benchmark`) eager and compiled and puts
ours / theirs ratios in the same table.
"""

from __future__ import annotations

import importlib

import ml_collections


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
