"""The pieces several methods are made of: the siamese model and method, the EMA teacher, unit rows, AAM.

Siamese / SiameseMethod   encoder + the optional projector of a method's section, applied to each of
                          two views in its own call (BatchNorm statistics per view over the global
                          batch, like sslsv's two encoder calls under DDP with synchronised BN):
                          SimCLR's, VICReg's and MoCo's model; the step parts of a
                          method whose positive branch is view 2 (z2);
ema, momentum_tau         a momentum (teacher / target / key) network: tau t + (1 - tau) s, tau on
                          sslsv's half cosine from start_tau to end_tau;
normalise                 L2-normalised rows, at least float32;
aam                       ArcFace's additive angular margin (the supervised baseline's logits).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from ssps_jax.methods.base import Fail, Method, views_input
from ssps_jax.models import build_encoder
from ssps_jax.models.heads import Projector


def gathered(x: jnp.ndarray, axis_name: str | None) -> tuple[jnp.ndarray, jnp.ndarray | int]:
    """(every device's rows of `x`, in device order; the offset of this device's rows in them): the negatives of
    a contrastive loss over the global batch. Without an axis: `x` itself and 0."""
    if axis_name is None:
        return x, 0
    return lax.all_gather(x, axis_name, tiled=True), lax.axis_index(axis_name) * x.shape[0]


def normalise(x: jnp.ndarray) -> jnp.ndarray:
    """Unit rows (the last axis), computed in at least float32 (bf16 is widened; float64 stays)."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def ema(teacher, student, tau: jnp.ndarray):
    """teacher <- tau teacher + (1 - tau) student, leaf by leaf."""
    return jax.tree.map(lambda t, s: tau * t + (1 - tau) * s, teacher, student)


def momentum_tau(
    step: jnp.ndarray, total_steps: int, start: float = 0.996, end: float = 1.0, scheduled: bool = True
) -> jnp.ndarray | float:
    """tau from `start` to `end` by a half cosine over training (sslsv's MomentumUpdater); not `scheduled`: `start`
    (a Python float, so that 1 - tau is exact in the parameters' dtype)."""
    if not scheduled:
        return start
    return end - (end - start) * (jnp.cos(math.pi * step / total_steps) + 1) / 2


def validate_momentum(section: str, s: ml_collections.ConfigDict, fail: Fail) -> None:
    """A momentum network's `start_tau` and `end_tau` (of config section `section`, `s`): in [0, 1], in order."""
    for key in ("start_tau", "end_tau"):
        if not 0 <= s[key] <= 1:
            fail(f"{section}.{key}", f"must be in [0, 1], got {s[key]}")
    if s.start_tau > s.end_tau:
        fail(f"{section}.start_tau", f"{s.start_tau} is above end_tau {s.end_tau}")


def aam(cos: jnp.ndarray, margin) -> jnp.ndarray:
    """ArcFace's additive angular margin on cosines: cos(theta + m) while theta + m < pi; past that
    (cos(theta) <= cos(pi - m)) cos(theta) - m sin(m), which keeps the value decreasing in theta.

    `margin` is a Python float or an array broadcasting against `cos` (a margin per row).
    """
    if isinstance(margin, float):
        cos_m, sin_m, limit = math.cos(margin), math.sin(margin), math.cos(math.pi - margin)
    else:
        cos_m, sin_m, limit = jnp.cos(margin), jnp.sin(margin), jnp.cos(math.pi - margin)
    # sin(theta); the floor keeps the gradient finite at |cos| = 1 (sslsv's clamp to [0, 1] gives NaN there).
    sine = jnp.sqrt(jnp.clip(1.0 - cos**2, 1e-12, 1.0))
    return jnp.where(cos > limit, cos * cos_m - sine * sin_m, cos - sin_m * margin)


def projector_dims(section: ml_collections.ConfigDict) -> tuple[int, int] | None:
    """(hidden, output) of a method section's optional projector (`projector`, `projector_*_dim` keys)."""
    return (section.projector_hidden_dim, section.projector_output_dim) if section.projector else None


def output_dim(config: ml_collections.ConfigDict, section: ml_collections.ConfigDict) -> int:
    """The dimension of what a method with an optional projector compares: the projector's, else the encoder's."""
    return section.projector_output_dim if section.projector else config.model.encoder_dim


class Siamese(nn.Module):
    """Encoder (+ optional projector) applied to each of two views.

    Both views go through the model in one call, stacked on the batch axis
    (view-major), so every convolution runs once on twice the batch; the
    model's BatchNorms, built with `bn_groups=2`, normalise each view by its
    own statistics, which is what one call per view computes (sslsv's
    encoder sees one view at a time). One call moves fewer bytes: the
    weights are read, cast and laid out once per step instead of once per
    view (docs/performance.md).
    """

    encoder: nn.Module
    projector_dims: tuple[int, int] | None = None  # (hidden, output); None: no projector
    dtype: jnp.dtype = jnp.float32
    bn_axis_name: str | None = None

    def setup(self):
        if self.projector_dims is not None:
            self.projector = Projector(
                *self.projector_dims, dtype=self.dtype, bn_axis_name=self.bn_axis_name, bn_groups=2
            )

    def __call__(self, views: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
        """views (B, 2, n) -> embeddings of view 1 and view 2, each (B, D)."""
        if self.encoder.bn_groups != 2:
            raise ValueError(
                f"Siamese runs both views in one call: its encoder needs bn_groups=2, not {self.encoder.bn_groups}"
            )
        b = views.shape[0]
        y = self.encoder(jnp.concatenate([views[:, 0], views[:, 1]]), train=train)
        if self.projector_dims is not None:
            y = self.projector(y, train=train)
        return y[:b], y[b:]

    def embed(self, wave: jnp.ndarray, lengths: jnp.ndarray | None = None) -> jnp.ndarray:
        """Speaker embeddings for evaluation: the encoder output in inference mode."""
        return self.encoder(wave, lengths, train=False)


def siamese_model(
    config: ml_collections.ConfigDict, section: ml_collections.ConfigDict, bn_axis_name: str | None = None
) -> Siamese:
    """Encoder + the optional projector of `section` (`projector`, `projector_hidden_dim`, `projector_output_dim`)."""
    return Siamese(
        encoder=build_encoder(config.model, bn_axis_name, bn_groups=2),
        projector_dims=projector_dims(section),
        dtype=jnp.dtype(config.model.dtype),
        bn_axis_name=bn_axis_name,
    )


class SiameseMethod(Method):
    """A method trained on two crops a utterance, each through the model in its own call.

    By default: the model is `siamese_model` of the method's section, its outputs are
    the two views' embeddings (z1, z2), and the positive branch is z2.
    """

    crop_mode = "siamese"

    @property
    def sslsv_sizes(self) -> dict[str, str]:
        return {"projector": f"{self.name}.projector_hidden_dim / projector_output_dim"}

    def build_model(self, config: ml_collections.ConfigDict, bn_axis_name: str | None = None) -> nn.Module:
        return siamese_model(config, config[self.name], bn_axis_name)

    def example_input(self, config: ml_collections.ConfigDict) -> jax.ShapeDtypeStruct:
        return views_input(config.data.crops.frame_seconds)

    def positive_shape(self, config: ml_collections.ConfigDict) -> tuple[int, int]:
        return 1, output_dim(config, config[self.name])

    def forward(self, variables, batch, rng, *, model, settings):
        outputs, updates = model.apply(
            variables,
            batch["views"],
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": rng},  # for stochastic layers; the encoders here have none
        )
        return outputs, updates["batch_stats"]

    def online_positive(self, outputs):
        return outputs[1][None]

    # What stands in its positive branch, for `reference_misfit`'s message.
    positive_what = "a projector output"

    def reference_misfit(self, config: ml_collections.ConfigDict) -> str | None:
        if output_dim(config, config[self.name]) == config.model.encoder_dim:
            return None
        return f"{self.positive_what}: needs {self.name}.projector_output_dim == model.encoder_dim"
