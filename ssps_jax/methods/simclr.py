"""SimCLR (Chen et al., 2020) for speaker embeddings, as sslsv trains it (docs/method.md §6).

The model is methods/common.py's siamese one: each view goes through the
encoder (and the optional projector) in its own call, so BatchNorm
statistics are per view over the global batch, exactly like sslsv's two
encoder calls under DDP with synchronised BN. The loss is NT-Xent over both
views of the global batch, the negatives gathered from every device.

`simclr.loss` adds a margin to NT-Xent (sslsv's SimCLRMargins:
CosFace, ArcFace, SphereFace, CurricularFace, MagFace, AdaFace, with sslsv's
margin scheduler; methods/margins.py). The plain "nt-xent" is `nt_xent`.

With SSPS the positive branch is view 2: its embedding z' is what the
positive queue holds, and a pseudo-positive replaces it before the loss.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from ssps_jax.methods import margins
from ssps_jax.methods.base import Fail
from ssps_jax.methods.common import SiameseMethod, gathered
from ssps_jax.sharding import DATA


def nt_xent(z1: jnp.ndarray, z2: jnp.ndarray, temperature: float, axis_name: str | None = None) -> jnp.ndarray:
    """NT-Xent of this device's anchors against the views of the whole global batch.

    z1, z2: (n, D) embeddings of the two views of this device's n examples.
    Every one of the 2n local embeddings is an anchor; its positive is the
    other view of the same example; its negatives are all other 2N - 2
    embeddings of the global batch (N = n x devices), gathered over
    `axis_name`. Returns the mean over local anchors; the mean of that over
    devices (a pmean) is the loss of the global batch.
    """
    z = jnp.concatenate([z1, z2], axis=0).astype(jnp.float32)
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    n2 = z.shape[0]
    everyone, offset = gathered(z, axis_name)  # (2N, D)
    logits = z @ everyone.T / temperature  # (2n, 2N)
    rows = jnp.arange(n2)
    own = offset + rows
    positive = offset + (rows + n2 // 2) % n2
    logits = logits.at[rows, own].set(-jnp.inf)  # an anchor is not its own negative
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[rows, positive])


@dataclasses.dataclass(frozen=True)
class SimCLRSettings:
    temperature: float
    margins: margins.Margins | None = None  # None: plain NT-Xent
    steps_per_epoch: int = 1
    epochs: int = 1  # train.epochs: the margin scheduler's span


class SimCLRMethod(SiameseMethod):
    name = "simclr"
    title = "SimCLR"
    summary = "SimCLR: NT-Xent temperature, optional projector"
    demo_config = "demo_ssps.py"

    def default_config(self) -> dict:
        return {
            "temperature": 0.03,
            "projector": False,  # the SSPS paper's SimCLR has none
            "projector_hidden_dim": 2048,
            "projector_output_dim": 128,
            # NT-Xent with an additive margin (sslsv's SimCLRMargins): one of methods/margins.py's LOSSES;
            # "nt-xent" is plain SimCLR. The logits' scale is 1 / temperature (sslsv's scale 33.33: 0.03).
            "loss": "nt-xent",
            "margin": 0.1,  # m (radians for arcface / curricularface / adaface; a multiplier for sphereface)
            "margin_scheduler": False,  # cosface / arcface / sphereface: m from 0 over the first half of training
            "magface_l_margin": 0.01,  # MagFace: margins from l_margin to u_margin ...
            "magface_u_margin": 0.05,
            "magface_l_a": 10.0,  # ... for embedding norms from l_a to u_a
            "magface_u_a": 110.0,
            "magface_lambda_g": 0.0,  # weight of MagFace's norm regulariser
            "adaface_h": 0.333,  # AdaFace: how far the norm moves the margin
        }

    def validate(self, config: ml_collections.ConfigDict, fail: Fail) -> None:
        s = config.simclr
        if s.temperature <= 0:
            fail("simclr.temperature", f"must be > 0, got {s.temperature}")
        if s.loss not in margins.LOSSES:
            fail("simclr.loss", f"must be one of {margins.LOSSES}, got {s.loss!r}")
        if s.margin < 0:
            fail("simclr.margin", f"must be >= 0, got {s.margin}")
        if s.margin_scheduler and s.loss not in margins.SCHEDULED:
            fail("simclr.margin_scheduler", f"schedules the margin of {', '.join(margins.SCHEDULED)} (as sslsv)")
        if not 0 < s.magface_l_a < s.magface_u_a:
            fail("simclr.magface_l_a", f"needs 0 < magface_l_a < magface_u_a, got {s.magface_l_a}, {s.magface_u_a}")

    def settings(self, config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> SimCLRSettings:
        s = config.simclr
        if s.loss == "nt-xent":
            return SimCLRSettings(temperature=s.temperature)
        m = margins.Margins(
            loss=s.loss,
            margin=float(s.margin),
            scheduler=s.margin_scheduler,
            magface_l_margin=s.magface_l_margin,
            magface_u_margin=s.magface_u_margin,
            magface_l_a=s.magface_l_a,
            magface_u_a=s.magface_u_a,
            magface_lambda_g=s.magface_lambda_g,
            adaface_h=s.adaface_h,
        )
        return SimCLRSettings(s.temperature, m, steps_per_epoch, total_steps // steps_per_epoch)

    def init_state(self, config: ml_collections.ConfigDict, variables: dict) -> dict | None:
        """The running statistics of CurricularFace and AdaFace (sslsv's loss buffers); None for the others."""
        initial = margins.INITIAL_STATS.get(config.simclr.loss)
        return None if initial is None else {"margin_stats": {k: jnp.float32(v) for k, v in initial.items()}}

    def loss(self, outputs, positive, *, state, settings: SimCLRSettings, **_):
        s = settings
        if s.margins is None:
            return nt_xent(outputs[0], positive[0], s.temperature, axis_name=DATA), {}
        stats = self._margin_stats(state, outputs, positive, s)
        margin = margins.scheduled_margin(s.margins, state.step // s.steps_per_epoch, s.epochs)
        return margins.margin_nt_xent(outputs[0], positive[0], s.temperature, s.margins, margin, stats, DATA), {}

    def update(self, state, params, outputs, positive, target, *, settings: SimCLRSettings):
        s = settings
        if s.margins is None:
            return state.method_state, {}
        margin = margins.scheduled_margin(s.margins, state.step // s.steps_per_epoch, s.epochs)
        stats = self._margin_stats(state, outputs, positive, s)
        method_state = None if stats is None else {"margin_stats": stats}
        return method_state, {"margin": jnp.asarray(margin, jnp.float32)}

    @staticmethod
    def _margin_stats(state, outputs, positive, s: SimCLRSettings):
        """The loss's running statistics after this batch (the loss uses them; `update` keeps them)."""
        old = None if state.method_state is None else state.method_state["margin_stats"]
        return margins.running_stats(s.margins, outputs[0], positive[0], old, DATA)


METHOD = SimCLRMethod()
