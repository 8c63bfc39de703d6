"""BYOL (Grill et al., 2020) for speaker embeddings, as sslsv trains it (docs/method.md §6.7).

The online network is encoder + sslsv's siamese projector (Linear-BN-ReLU x 2,
Linear) + predictor (Linear-BN-ReLU, Linear); the target network is encoder +
projector with variables of its own in the method state (`target`): an EMA
of the online encoder's and projector's parameters (tau from start_tau to
end_tau by sslsv's half cosine when `tau_scheduler`), with BatchNorm
statistics of its own, updated by its training-mode passes, as sslsv's
momentum modules. Each view goes through both networks in its own call
(BatchNorm statistics per view over the global batch). The loss is sslsv's,
summed over the two directions:

    loss = (2 - 2 mean cos(p1, z2')) + (2 - 2 mean cos(p2, z1'))

(p: online predictions, z': target projections, constants). Evaluation
embeds with the online encoder.

With SSPS (not in sslsv, whose BYOL has none; written as its MoCo does it)
the positive branch is the target's: y^ comes from the online encoder
(inference mode), both target projections of a covered anchor are replaced
by the pair stored in the positive queue before the loss, and the positive
queue receives the original target projections.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
from jax import lax

from ssps_jax.methods.base import Fail, Target
from ssps_jax.methods.common import SiameseMethod, ema, momentum_tau, normalise, validate_momentum
from ssps_jax.models import build_encoder
from ssps_jax.models.heads import Projector


class BYOL(nn.Module):
    """Encoder, projector, predictor (sslsv's names); `projections` is the encoder + projector alone."""

    encoder: nn.Module
    projector_dims: tuple[int, int]  # (hidden, output)
    predictor_hidden_dim: int
    dtype: jnp.dtype = jnp.float32
    bn_axis_name: str | None = None

    def setup(self):
        self.projector = Projector(*self.projector_dims, dtype=self.dtype, bn_axis_name=self.bn_axis_name)
        # sslsv's predictor: Linear-BN-ReLU, then Linear back to the projection size.
        self.predictor = Projector(
            self.predictor_hidden_dim,
            self.projector_dims[1],
            dtype=self.dtype,
            bn_axis_name=self.bn_axis_name,
            hidden_layers=1,
        )

    def __call__(self, views: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
        """views (B, 2, n) -> the online predictions of view 1 and view 2, each (B, D)."""
        return tuple(self.predictor(z, train=train) for z in self.projections(views, train))

    def projections(self, views: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
        """views (B, 2, n) -> the projections of view 1 and view 2 (with the target's variables: z1', z2')."""
        return tuple(self.projector(self.encoder(views[:, v], train=train), train=train) for v in range(2))

    def embed(self, wave: jnp.ndarray, lengths: jnp.ndarray | None = None) -> jnp.ndarray:
        return self.encoder(wave, lengths, train=False)


def byol_loss(p: jnp.ndarray, z: jnp.ndarray) -> jnp.ndarray:
    """2 - 2 x the mean cosine of this device's predictions p (n, D) and target projections z (n, D).

    The pmean over devices (equal slices) is the global batch's loss.
    """
    return 2 - 2 * jnp.mean(jnp.sum(normalise(p) * normalise(lax.stop_gradient(z)), axis=-1))


@dataclasses.dataclass(frozen=True)
class BYOLSettings:
    start_tau: float
    end_tau: float
    tau_scheduler: bool
    total_steps: int


class BYOLMethod(SiameseMethod):
    name = "byol"
    title = "BYOL"
    summary = "BYOL: projector and predictor sizes, target network EMA (tau)"
    demo_config = "demo_byol_ssps.py"
    positive_what = "a target projection"
    sslsv_momentum = ("target", {"encoder": "encoder_momentum", "projector": "projector_momentum"})

    @property
    def sslsv_sizes(self) -> dict[str, str]:
        return {**super().sslsv_sizes, "predictor": "byol.predictor_hidden_dim / projector_output_dim"}

    def default_config(self) -> dict:
        return {  # sslsv's BYOL defaults
            "projector_hidden_dim": 4096,
            "projector_output_dim": 256,
            "predictor_hidden_dim": 4096,
            "start_tau": 0.996,
            "end_tau": 1.0,
            "tau_scheduler": True,  # tau from start_tau to end_tau by a half cosine over training; False: start_tau
        }

    def validate(self, config: ml_collections.ConfigDict, fail: Fail) -> None:
        b = config.byol
        for key in ("projector_hidden_dim", "projector_output_dim", "predictor_hidden_dim"):
            if b[key] < 1:
                fail(f"byol.{key}", f"must be >= 1, got {b[key]}")
        validate_momentum("byol", b, fail)

    def build_model(self, config: ml_collections.ConfigDict, bn_axis_name: str | None = None) -> BYOL:
        b = config.byol
        return BYOL(
            encoder=build_encoder(config.model, bn_axis_name),
            projector_dims=(b.projector_hidden_dim, b.projector_output_dim),
            predictor_hidden_dim=b.predictor_hidden_dim,
            dtype=jnp.dtype(config.model.dtype),
            bn_axis_name=bn_axis_name,
        )

    def settings(self, config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> BYOLSettings:
        b = config.byol
        return BYOLSettings(b.start_tau, b.end_tau, b.tau_scheduler, total_steps)

    def init_state(self, config: ml_collections.ConfigDict, variables: dict) -> dict:
        """The target network starts as a copy of the online encoder and projector."""
        return {"target": {c: {k: tree[k] for k in ("encoder", "projector")} for c, tree in variables.items()}}

    def positive_shape(self, config: ml_collections.ConfigDict) -> tuple[int, int]:
        """Both target projections."""
        return 2, config.byol.projector_output_dim

    def reference_misfit(self, config: ml_collections.ConfigDict) -> str | None:
        if config.byol.projector_output_dim == config.model.encoder_dim:
            return None
        return f"{self.positive_what}: needs byol.projector_output_dim == model.encoder_dim"

    def target(self, state, batch, *, model, settings):
        """The target network's (training-mode) projections of both views: (2, n, D)."""
        target = state.method_state["target"]
        z, updates = model.apply(
            target, batch["views"], train=True, method=type(model).projections, mutable=["batch_stats"]
        )
        return Target(lax.stop_gradient(jnp.stack(z)), updates)

    def loss(self, outputs, positive, **_):
        p1, p2 = outputs
        return byol_loss(p1, positive[1]) + byol_loss(p2, positive[0]), {}

    def update(self, state, params, outputs, positive, target, *, settings: BYOLSettings):
        """The target network's EMA step towards the online encoder and projector."""
        s = settings
        old = state.method_state["target"]
        tau = momentum_tau(state.step, s.total_steps, s.start_tau, s.end_tau, s.tau_scheduler)
        online = {k: params[k] for k in old["params"]}
        return {"target": {"params": ema(old["params"], online, tau), **target.updates}}, {
            "tau": jnp.asarray(tau, jnp.float32)
        }


METHOD = BYOLMethod()
