"""Barlow Twins (Zbontar et al., 2021) for speaker embeddings, as sslsv trains it (docs/method.md §6.8).

The model is the siamese one (methods/common.py): encoder + sslsv's siamese
projector, each view in its own call, so BatchNorm statistics are per view
over the global batch. The loss (`barlow_twins_loss`) makes the
cross-correlation matrix of the two views' standardised projector outputs
the identity: its diagonal terms pull each dimension's two views together,
its off-diagonal terms (weighted by lambda) decorrelate the dimensions.

sslsv standardises each device's rows with an unsynchronised BatchNorm and
averages the devices' matrices; here the statistics and the matrix are the
global batch's (gathered, as VICReg's, and as the paper's synchronised
BatchNorm), so a step on 8 devices equals one on 1 -- and equals sslsv's on
one device.

With SSPS the positive branch is view 2, as in sslsv's siamese methods: z2
is what the positive queue holds, and a pseudo-positive replaces it before
the loss.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections
from jax import lax

from ssps_jax.methods.base import Fail
from ssps_jax.methods.common import SiameseMethod
from ssps_jax.sharding import DATA


def _standardised(z: jnp.ndarray) -> jnp.ndarray:
    """Each dimension to zero mean and unit variance over the batch (BatchNorm without affine parameters, in
    training mode: the biased variance, eps 1e-5 inside the root)."""
    return (z - jnp.mean(z, axis=0)) / jnp.sqrt(jnp.var(z, axis=0) + 1e-5)


def barlow_twins_loss(
    z1: jnp.ndarray, z2: jnp.ndarray, lamda: float, scale: float, axis_name: str | None = None
) -> jnp.ndarray:
    """scale x (sum_i (1 - C_ii)^2 + lamda sum_{i != j} C_ij^2), C the (D, D) cross-correlation of the views.

    z1, z2: (n, D) projector outputs of this device's examples; gathered over
    `axis_name`, so every device computes the global batch's loss (its pmean
    over devices is that loss, and per-device gradients flow back through
    the gathers, as for vicreg_loss).
    """
    dtype = jnp.promote_types(jnp.promote_types(z1.dtype, z2.dtype), jnp.float32)
    z1, z2 = z1.astype(dtype), z2.astype(dtype)
    if axis_name is not None:
        z1 = lax.all_gather(z1, axis_name, tiled=True)
        z2 = lax.all_gather(z2, axis_name, tiled=True)
    c = _standardised(z1).T @ _standardised(z2) / z1.shape[0]
    on_diagonal = jnp.sum((jnp.diagonal(c) - 1) ** 2)
    off_diagonal = jnp.sum(c**2) - jnp.sum(jnp.diagonal(c) ** 2)
    return scale * (on_diagonal + lamda * off_diagonal)


@dataclasses.dataclass(frozen=True)
class BarlowTwinsSettings:
    lamda: float
    scale: float


class BarlowTwinsMethod(SiameseMethod):
    name = "barlow_twins"
    title = "Barlow Twins"
    summary = "Barlow Twins: redundancy-reduction weight lamda, loss scale, projector"
    demo_config = "demo_barlow_twins_ssps.py"

    def default_config(self) -> dict:
        return {  # sslsv's Barlow Twins defaults
            "lamda": 0.005,  # weight of the off-diagonal (redundancy) terms; sslsv's spelling
            "scale": 0.025,  # of the whole loss (sslsv's BarlowTwinsLoss default)
            "projector": True,
            "projector_hidden_dim": 8192,
            "projector_output_dim": 8192,
        }

    def validate(self, config: ml_collections.ConfigDict, fail: Fail) -> None:
        b = config.barlow_twins
        if b.lamda < 0:
            fail("barlow_twins.lamda", f"must be >= 0, got {b.lamda}")
        if b.scale <= 0:
            fail("barlow_twins.scale", f"must be > 0, got {b.scale}")
        if b.projector:
            for key in ("projector_hidden_dim", "projector_output_dim"):
                if b[key] < 1:
                    fail(f"barlow_twins.{key}", f"must be >= 1, got {b[key]}")
        if config.train.global_batch_size < 2:
            fail("train.global_batch_size", "Barlow Twins standardises over the batch: at least 2 examples")

    def settings(self, config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int):
        return BarlowTwinsSettings(lamda=config.barlow_twins.lamda, scale=config.barlow_twins.scale)

    def loss(self, outputs, positive, *, settings: BarlowTwinsSettings, **_):
        return barlow_twins_loss(outputs[0], positive[0], settings.lamda, settings.scale, axis_name=DATA), {}


METHOD = BarlowTwinsMethod()
