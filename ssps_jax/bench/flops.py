"""FLOPs and MFU of `ssps-jax bench`: XLA's count of a compiled program, an analytic cross-check, peak FLOP/s.

FLOPs per step per device come from XLA's cost analysis of the compiled SSPS
step (`compiled.cost_analysis()["flops"]`: every HLO op of the partitioned
per-device program -- convolutions, matmuls, FFTs, elementwise work, the
optimizer -- with loop bodies counted once; this step has no loop whose trip
count matters). MFU = FLOPs / step time / the device's dense peak (PEAK_FLOPS;
ssps_jax/hardware.py; unknown on CPU, where only FLOP/s are printed).

Cross-check: an analytic count of the Conv and Dense layers (2 x multiply-adds
at the shapes they are called with, traced, `matmul_flops`) x 3 for forward +
backward of the trained views, + 1 forward of the reference crop; everything
else (mel front end, BatchNorm, loss, optimizer) is in the counted figure
only, so counted / analytic is a little above 1.

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


def analytic_step_flops(model, state, batch: dict, method: str, reference_variables: dict | None) -> int:
    """Conv + Dense FLOPs of one step on the global batch (see the module docstring); with SSPS
    (`reference_variables`: the variables y^ is computed with, the teacher's for DINO) the reference forward."""
    student = {"params": state.params, "batch_stats": state.batch_stats}
    if method == "dino":
        teacher = matmul_flops(lambda v, g: model.apply(v, g), state.method_state["teacher"], batch["global_views"])
        trained = matmul_flops(
            lambda v, g, loc: model.apply(v, g, loc, False, method=type(model).student),
            student,
            batch["global_views"],
            batch["local_views"],
        )
        total = teacher + 3 * trained
    else:
        total = 3 * matmul_flops(lambda v, x: model.apply(v, x), student, batch["views"])
    if reference_variables is not None:
        total += matmul_flops(
            lambda v, r: model.apply(v, r, method=type(model).embed), reference_variables, batch["reference"]
        )
    return total
