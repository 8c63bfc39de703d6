"""FLOPs and MFU of `ssps-jax bench`: XLA's count of a compiled program, an analytic cross-check, peak FLOP/s.

FLOPs per step per device come from XLA's cost analysis of the compiled SSPS
step (`compiled.cost_analysis()["flops"]`: every HLO op of the partitioned
per-device program -- convolutions, matmuls, FFTs, elementwise work, the
optimizer -- with loop bodies counted once; this step has no loop whose trip
count matters). MFU = FLOPs / step time / the device's dense peak (PEAK_FLOPS;
ssps_jax/hardware.py; unknown on CPU, where only FLOP/s are printed).

Cross-check: an analytic count of the Conv and Dense layers (2 x multiply-adds
at the shapes they are called with, traced, `matmul_flops`) of the method's
own step parts: its target forward once (DINO's teacher, MoCo's key network),
its trained forward x 3 (forward + backward), + 1 forward of the reference
crop with SSPS; everything else (mel front end, BatchNorm, loss, optimizer)
is in the counted figure only, so counted / analytic is a little above 1.

Where the counted figure is implausible -- below half the analytic count,
which happens on GPUs, where convolutions run as cuDNN custom calls that
XLA's cost analysis does not count (1% of the analytic count on an H200) --
the MFU reported is the analytic one, and the report says why (`mfu`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np

from ssps_jax.sharding import DATA


def counted_flops(compiled, key: str = "flops") -> float | None:
    """FLOPs (or another `key`, e.g. "bytes accessed") of one call of a compiled program per device, from XLA's
    cost analysis (None if not reported)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else None
    if not analysis or key not in analysis:
        return None
    return float(analysis[key])


# Counted FLOPs below this share of the analytic conv + dense count cannot be the whole program.
PLAUSIBLE_COUNTED_SHARE = 0.5


def mfu(counted: float | None, analytic: float, seconds: float, peak: float | None) -> dict:
    """MFU of a step from both FLOP counts, and which one is reported.

    Returns {"mfu": counted / seconds / peak, "mfu_analytic": analytic / seconds
    / peak (None without a peak), "mfu_basis": "counted" or "analytic", and
    "mfu_reported": the MFU of that basis}. The basis is "counted" unless the
    counted figure is missing or below PLAUSIBLE_COUNTED_SHARE of the analytic one.
    """
    plausible = bool(counted) and counted >= PLAUSIBLE_COUNTED_SHARE * analytic
    out = {
        "mfu": counted / seconds / peak if counted and peak else None,
        "mfu_analytic": analytic / seconds / peak if peak else None,
        "mfu_basis": "counted" if plausible else "analytic",
    }
    out["mfu_reported"] = out["mfu"] if plausible else out["mfu_analytic"]
    return out


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


def _as_one_device(fn):
    """fn(state, batch) as the train step runs it, with the global batch on one device: its collectives
    (BatchNorm's, the losses') over a `data` axis of size 1."""

    def call(state, batch):
        return jax.vmap(fn, in_axes=(None, 0), axis_name=DATA)(state, jax.tree.map(lambda x: x[None], batch))

    return call


def analytic_step_flops(run, state, batch: dict, reference_variables: dict | None) -> int:
    """Conv + Dense FLOPs of one step of `run` (a build.Run) on the global batch (see the module docstring); with
    SSPS (`reference_variables`: the variables y^ is computed with, the teacher's for DINO) the reference forward."""
    method, model = run.method, run.model
    settings = method.settings(run.config, run.steps_per_epoch, run.total_steps)
    rng = jax.random.PRNGKey(0)

    def target(s, b):
        return method.target(s, b, model=model, settings=settings)

    def trained(s, b):
        variables = {"params": s.params, "batch_stats": s.batch_stats}
        return method.forward(variables, b, rng, model=model, settings=settings)

    total = matmul_flops(_as_one_device(target), state, batch) + 3 * matmul_flops(_as_one_device(trained), state, batch)
    if reference_variables is not None:
        total += matmul_flops(
            lambda v, r: model.apply(v, r, method=type(model).embed), reference_variables, batch["reference"]
        )
    return total
