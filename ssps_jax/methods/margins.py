"""Additive margins for SimCLR's NT-Xent (sslsv's SimCLRMargins; Lepage and Dehak, 2023-2024).

`simclr.loss` picks the loss; "nt-xent" is the plain one (`nt_xent`). The others work on the cosines of
NT-Xent's logits, scaled by 1 / simclr.temperature (sslsv's `scale` 33.33 is temperature 0.03), and change
the positive pair's cosine -- and for SphereFace and CurricularFace the negatives' too -- before the
cross-entropy:

  cosface         cos - m
  arcface         cos(theta + m) while theta + m < pi, else cos - m sin(pi - m)   (ArcFace's additive
                  angular margin; `aam`)
  sphereface      every logit's value becomes (-1)^k cos(m' theta) - 2k, k = floor(m' theta / pi), m' = m
                  for the positive and 1 for the negatives, with the gradient of the plain cosine (sslsv
                  adds the difference as a constant)
  curricularface  the positive as arcface; a negative above the positive's cos(theta + m) becomes
                  cos (t + cos), t a running mean of the positive cosines (t <- 0.99 t + 0.01 mean)
  magface         arcface with a margin per anchor from its embedding's norm a, clipped to [l_a, u_a]:
                  m(a) = l_m + (u_m - l_m) (a - l_a) / (u_a - l_a), and lambda_g mean(a / u_a^2 + 1 / a)
                  added to the loss
  adaface         theta -> clip(theta - m s, eps, pi - eps), then cos - (m + m s), s = clip(h (a - mu) /
                  (sigma + 1e-3), -1, 1) from the norm a and running mean mu / std sigma of the norms
                  (mu <- 0.99 mu + 0.01 mean, likewise sigma; from 20 and 100)

`margin_scheduler` (CosFace, ArcFace, SphereFace, as sslsv): the margin rises from 0 at epoch 0 to m by
a half cosine over the first half of training, then stays at m.

The running statistics (CurricularFace's t, AdaFace's mu and sigma) are the method's state; sslsv keeps
one per device from that device's rows, here they are the global batch's (one device: the same).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from ssps_jax.methods.common import aam, gathered

LOSSES = (
    "nt-xent",
    "nt-xent-cosface",
    "nt-xent-arcface",
    "nt-xent-sphereface",
    "nt-xent-curricularface",
    "nt-xent-magface",
    "nt-xent-adaface",
)
SCHEDULED = ("nt-xent-cosface", "nt-xent-arcface", "nt-xent-sphereface")  # the margins the scheduler moves
# The running statistics of a loss, at the start of training (sslsv's buffers).
INITIAL_STATS = {"nt-xent-curricularface": {"t": 0.0}, "nt-xent-adaface": {"norm_mean": 20.0, "norm_std": 100.0}}
_MOMENTUM = 0.01  # of the running statistics: x <- (1 - 0.01) x + 0.01 batch value
_ADAFACE_EPS = 1e-3
_ACOS_LIMIT = 1 - 1e-7  # cosines clipped inside (-1, 1): arccos and its gradient stay finite


@dataclasses.dataclass(frozen=True)
class Margins:
    """The margin settings of `config.simclr` (static)."""

    loss: str
    margin: float
    scheduler: bool
    magface_l_margin: float
    magface_u_margin: float
    magface_l_a: float
    magface_u_a: float
    magface_lambda_g: float
    adaface_h: float


def scheduled_margin(m: Margins, epoch: jnp.ndarray, epochs: int):
    """The margin of `epoch` (0-based) of `epochs`: from 0 by a half cosine to m over the first half, as sslsv."""
    half = epochs // 2
    if not (m.scheduler and m.loss in SCHEDULED) or half == 0:
        return m.margin
    ramp = m.margin - m.margin * (jnp.cos(math.pi * epoch / half) + 1) / 2
    return jnp.where(epoch > half, m.margin, ramp)


def running_stats(m: Margins, z1: jnp.ndarray, z2: jnp.ndarray, stats: dict | None, axis_name: str | None):
    """The loss's running statistics after this batch (constants), from this device's (n, D) views.

    CurricularFace: t from the mean positive cosine; AdaFace: the mean and unbiased std of the embedding
    norms (clipped to [0.001, 100]); both over the global batch.
    """
    if m.loss not in INITIAL_STATS:
        return stats
    z1, z2 = (lax.stop_gradient(z).astype(jnp.promote_types(z.dtype, jnp.float32)) for z in (z1, z2))
    keep = 1 - _MOMENTUM
    if m.loss == "nt-xent-curricularface":
        unit = [z / jnp.maximum(jnp.linalg.norm(z, axis=1, keepdims=True), 1e-12) for z in (z1, z2)]
        positive = jnp.mean(jnp.sum(unit[0] * unit[1], axis=1))  # each pair twice among the 2n anchors
        positive = positive if axis_name is None else lax.pmean(positive, axis_name)
        return {"t": _MOMENTUM * positive + keep * stats["t"]}
    norms = jnp.clip(jnp.linalg.norm(jnp.concatenate([z1, z2]), axis=1), 0.001, 100)
    norms = norms if axis_name is None else lax.all_gather(norms, axis_name, tiled=True)
    return {
        "norm_mean": _MOMENTUM * jnp.mean(norms) + keep * stats["norm_mean"],
        "norm_std": _MOMENTUM * jnp.std(norms, ddof=1) + keep * stats["norm_std"],
    }


def _sphereface(cos: jnp.ndarray, multiplier) -> jnp.ndarray:
    """(-1)^k cos(m theta) - 2k, k = floor(m theta / pi), with the gradient of `cos` (as sslsv)."""
    theta = multiplier * jnp.arccos(jnp.clip(cos, -1 + 1e-5, 1 - 1e-5))
    k = jnp.floor(theta / math.pi)
    phi = (1 - 2 * jnp.mod(k, 2)) * jnp.cos(theta) - 2 * k
    return cos + lax.stop_gradient(phi - cos)


def margin_nt_xent(
    z1: jnp.ndarray,
    z2: jnp.ndarray,
    temperature: float,
    m: Margins,
    margin,
    stats: dict | None,
    axis_name: str | None = None,
) -> jnp.ndarray:
    """NT-Xent of this device's anchors with the margin of `m.loss` (module docstring).

    As `simclr.nt_xent`: every one of the 2n local embeddings is an anchor, its
    positive the other view, its negatives the other 2N - 2 embeddings of the
    global batch, gathered over `axis_name`; the logits are cosines / temperature.
    `margin` is this step's (`scheduled_margin`); `stats` the running statistics
    after this batch (`running_stats`). Returns the mean over local anchors.
    """
    a = jnp.concatenate([z1, z2], axis=0).astype(jnp.float32)
    norms = jnp.linalg.norm(a, axis=1)
    z = a / jnp.maximum(norms, 1e-12)[:, None]
    n2 = z.shape[0]
    everyone, offset = gathered(z, axis_name)  # (2N, D)
    cos = z @ everyone.T  # (2n, 2N)
    rows = jnp.arange(n2)
    positive_at = offset + (rows + n2 // 2) % n2
    positive = cos[rows, positive_at]
    extra = 0.0
    if m.loss == "nt-xent-cosface":
        positive = positive - margin
    elif m.loss == "nt-xent-arcface":
        positive = aam(positive, margin)
    elif m.loss == "nt-xent-sphereface":
        cos = _sphereface(cos, 1.0)
        positive = _sphereface(positive, margin)
    elif m.loss == "nt-xent-curricularface":
        sine = jnp.sqrt(jnp.clip(1.0 - positive**2, 0.0, 1.0))
        with_margin = positive * math.cos(m.margin) - sine * math.sin(m.margin)
        hard = cos > with_margin[:, None]  # negatives above the positive's cos(theta + m)
        cos = jnp.where(hard, cos * (stats["t"] + cos), cos)
        positive = aam(positive, m.margin)
    elif m.loss == "nt-xent-magface":
        a_clipped = jnp.clip(norms, m.magface_l_a, m.magface_u_a)
        slope = (m.magface_u_margin - m.magface_l_margin) / (m.magface_u_a - m.magface_l_a)
        positive = aam(positive, slope * (a_clipped - m.magface_l_a) + m.magface_l_margin)
        extra = m.magface_lambda_g * jnp.mean(a_clipped / m.magface_u_a**2 + 1 / a_clipped)
    elif m.loss == "nt-xent-adaface":
        a_clipped = lax.stop_gradient(jnp.clip(norms, 0.001, 100))
        scaler = jnp.clip((a_clipped - stats["norm_mean"]) / (stats["norm_std"] + _ADAFACE_EPS) * m.adaface_h, -1, 1)
        theta = jnp.arccos(jnp.clip(positive, -_ACOS_LIMIT, _ACOS_LIMIT))
        theta = jnp.clip(theta - m.margin * scaler, _ADAFACE_EPS, math.pi - _ADAFACE_EPS)
        positive = jnp.cos(theta) - (m.margin + m.margin * scaler)
    logits = cos.at[rows, positive_at].set(positive).at[rows, offset + rows].set(-jnp.inf) / temperature
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - positive / temperature) + extra
