"""VICReg (Bardes et al., 2022) for speaker embeddings, as sslsv trains it (docs/method.md §6).

The model is the siamese one (methods/common.py): encoder + sslsv's siamese
projector, each view in its own call, so BatchNorm statistics are per view
over the global batch. The loss (`vicreg_loss`) is a weighted sum of three
terms on the projector outputs of the two views: invariance (the mean
squared difference of the pairs), variance (a hinge keeping each
dimension's standard deviation over the global batch at 1) and covariance
(the squared off-diagonal covariances over the global batch, per dimension).

With SSPS the positive branch is view 2, as in SimCLR: z2 is what the
positive queue holds, and a pseudo-positive replaces it before the loss (in
all three terms, as sslsv's VICReg gives the replaced Z_2 to its loss).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from ssps_jax.methods.base import Fail
from ssps_jax.methods.common import SiameseMethod
from ssps_jax.sharding import DATA


def _variance_term(z: jnp.ndarray) -> jnp.ndarray:
    """mean over dimensions of relu(1 - std), std unbiased over the batch (+1e-4 inside the root, as sslsv)."""
    std = jnp.sqrt(jnp.var(z, axis=0, ddof=1) + 1e-4)
    return jnp.mean(jax.nn.relu(1.0 - std))


def _covariance_term(z: jnp.ndarray) -> jnp.ndarray:
    """Sum of the squared off-diagonal entries of the (unbiased) covariance matrix, over the dimension."""
    n, d = z.shape
    centred = z - jnp.mean(z, axis=0)
    cov = centred.T @ centred / (n - 1)
    return (jnp.sum(cov**2) - jnp.sum(jnp.diagonal(cov) ** 2)) / d


def vicreg_loss(
    z1: jnp.ndarray,
    z2: jnp.ndarray,
    inv_weight: float,
    var_weight: float,
    cov_weight: float,
    axis_name: str | None = None,
) -> jnp.ndarray:
    """VICReg of this device's pairs, the variance and covariance over the global batch.

    z1, z2: (n, D) projector outputs of the two views of this device's n
    examples. The invariance term is this device's mean squared error (its
    pmean over devices is the global batch's, the devices holding equal
    slices); the variance and covariance terms are statistics of the whole
    global batch, gathered over `axis_name`, so every device computes the
    same value. As for nt_xent, the pmean of this over devices is the loss of
    the global batch, and per-device gradients flow back through the gather.
    """
    # At least float32 (bf16 encoder outputs without a projector are widened; float64 stays).
    dtype = jnp.promote_types(jnp.promote_types(z1.dtype, z2.dtype), jnp.float32)
    z1, z2 = z1.astype(dtype), z2.astype(dtype)
    invariance = jnp.mean((z1 - z2) ** 2)
    if axis_name is not None:
        z1 = lax.all_gather(z1, axis_name, tiled=True)
        z2 = lax.all_gather(z2, axis_name, tiled=True)
    variance = _variance_term(z1) + _variance_term(z2)
    covariance = _covariance_term(z1) + _covariance_term(z2)
    return inv_weight * invariance + var_weight * variance + cov_weight * covariance


@dataclasses.dataclass(frozen=True)
class VICRegSettings:
    inv_weight: float
    var_weight: float
    cov_weight: float


class VICRegMethod(SiameseMethod):
    name = "vicreg"
    title = "VICReg"
    summary = "VICReg: invariance / variance / covariance weights, projector"
    demo_config = "demo_vicreg_ssps.py"

    def default_config(self) -> dict:
        return {  # sslsv's VICReg defaults (the SSPS experiments use a 2048-512 projector: configs/vicreg_*.py)
            "inv_weight": 1.0,
            "var_weight": 1.0,
            "cov_weight": 0.04,
            "projector": True,
            "projector_hidden_dim": 8192,
            "projector_output_dim": 8192,
        }

    def validate(self, config: ml_collections.ConfigDict, fail: Fail) -> None:
        v = config.vicreg
        for key in ("inv_weight", "var_weight", "cov_weight"):
            if v[key] < 0:
                fail(f"vicreg.{key}", f"must be >= 0, got {v[key]}")
        if v.projector:
            for key in ("projector_hidden_dim", "projector_output_dim"):
                if v[key] < 1:
                    fail(f"vicreg.{key}", f"must be >= 1, got {v[key]}")
        if config.train.global_batch_size < 2:
            fail("train.global_batch_size", "VICReg's variance and covariance need at least 2 examples")

    def settings(self, config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> VICRegSettings:
        v = config.vicreg
        return VICRegSettings(inv_weight=v.inv_weight, var_weight=v.var_weight, cov_weight=v.cov_weight)

    def loss(self, outputs, positive, *, settings: VICRegSettings, **_):
        s = settings
        return vicreg_loss(outputs[0], positive[0], s.inv_weight, s.var_weight, s.cov_weight, axis_name=DATA), {}


METHOD = VICRegMethod()
