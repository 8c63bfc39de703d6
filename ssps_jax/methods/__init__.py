"""Self-supervised methods, built from a config: the model, its optimizer and its step settings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from ssps_jax.methods.dino import DINO, DINOHead
from ssps_jax.methods.simclr import SimCLR
from ssps_jax.models import build_encoder
from ssps_jax.optim import make_optimizer


def build_model(config: ml_collections.ConfigDict, bn_axis_name: str | None = None) -> SimCLR | DINO:
    """The trainable model of `config.method` (encoder and heads)."""
    dtype = jnp.dtype(config.model.dtype)
    encoder = build_encoder(config.model, bn_axis_name)
    if config.method == "dino":
        d = config.dino
        head = DINOHead(d.head_hidden_dim, d.head_bottleneck_dim, d.head_output_dim, dtype, bn_axis_name)
        return DINO(encoder=encoder, head=head)
    s = config.simclr
    return SimCLR(
        encoder=encoder,
        projector_dims=(s.projector_hidden_dim, s.projector_output_dim) if s.projector else None,
        dtype=dtype,
        bn_axis_name=bn_axis_name,
    )


def _last_layer(params):
    """True on the DINO head's last layer."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: "last_layer" in k for k in flat})


def build_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The method's optimizer: DINO keeps its head's last layer frozen for `dino.freeze_last_layer_epochs`."""
    if config.method == "dino":
        return make_optimizer(
            config.optim, steps_per_epoch, total_steps, _last_layer, config.dino.freeze_last_layer_epochs
        )
    return make_optimizer(config.optim, steps_per_epoch, total_steps)


def example_input(config: ml_collections.ConfigDict) -> jax.ShapeDtypeStruct:
    """The shape the model is initialised with: (batch, views, samples) of one crop length."""
    crops = config.data.crops
    seconds = crops.global_seconds if config.method == "dino" else crops.frame_seconds
    return jax.ShapeDtypeStruct((2, 2, round(seconds * 16000)), jnp.float32)


def teacher_outputs(config: ml_collections.ConfigDict) -> int:
    """Size of the teacher's output (DINO), 0 for methods without a teacher."""
    return config.dino.head_output_dim if config.method == "dino" else 0


def positive_dim(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(views, dimension) of the positive-branch embeddings SSPS queues (SPEC section 3)."""
    if config.method == "dino":
        return config.data.crops.global_count, config.dino.head_output_dim
    s = config.simclr
    return 1, s.projector_output_dim if s.projector else config.model.encoder_dim
