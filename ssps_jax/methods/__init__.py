"""Self-supervised methods, built from a config."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from ssps_jax.methods.simclr import SimCLR
from ssps_jax.models import build_encoder


def build_model(config: ml_collections.ConfigDict, bn_axis_name: str | None = None) -> SimCLR:
    """The trainable model of `config.method` (encoder and heads)."""
    s = config.simclr
    return SimCLR(
        encoder=build_encoder(config.model, bn_axis_name),
        projector_dims=(s.projector_hidden_dim, s.projector_output_dim) if s.projector else None,
        dtype=jnp.dtype(config.model.dtype),
        bn_axis_name=bn_axis_name,
    )
