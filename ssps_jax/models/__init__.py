"""Encoders and heads, built from the `model` section of a config."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from ssps_jax.features import LogMelConfig
from ssps_jax.models.ecapa_tdnn import ECAPATDNN
from ssps_jax.models.resnet34 import ResNet34


def build_encoder(model: ml_collections.ConfigDict, bn_axis_name: str | None = None):
    """The encoder described by `config.model` (waveform in, embedding out)."""
    mel = LogMelConfig(**model.mel)
    common = dict(mel=mel, encoder_dim=model.encoder_dim, dtype=jnp.dtype(model.dtype), bn_axis_name=bn_axis_name)
    if model.encoder == "ecapa_tdnn":
        e = model.ecapa_tdnn
        return ECAPATDNN(
            channels=tuple(e.channels),
            kernel_sizes=tuple(e.kernel_sizes),
            dilations=tuple(e.dilations),
            attention_channels=e.attention_channels,
            res2net_scale=e.res2net_scale,
            se_channels=e.se_channels,
            global_context=e.global_context,
            **common,
        )
    return ResNet34(base_dim=model.resnet34.base_dim, layers=tuple(model.resnet34.layers), **common)
