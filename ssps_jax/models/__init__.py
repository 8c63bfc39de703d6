"""Encoders and heads, built from the `model` section of a config: its defaults, checks and the encoder."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from ssps_jax.features import LogMelConfig
from ssps_jax.models.ecapa_tdnn import ECAPATDNN
from ssps_jax.models.resnet34 import ResNet34

ENCODERS = ("ecapa_tdnn", "resnet34")
DTYPES = ("float32", "bfloat16")
WINDOWS = ("hamming", "hann")


def default_config() -> dict:
    """`config.model`: sslsv's ECAPA-TDNN (C = 512) on 40 Hamming log-mels."""
    return {
        "encoder": "ecapa_tdnn",
        "encoder_dim": 512,
        "dtype": "float32",  # compute dtype; parameters stay float32
        "mel": {"n_mels": 40, "window": "hamming", "n_fft": 512, "win_length": 400, "hop_length": 160},
        "ecapa_tdnn": {
            "channels": (512, 512, 512, 512, 1536),
            "kernel_sizes": (5, 3, 3, 3, 1),
            "dilations": (1, 2, 3, 4, 1),
            "attention_channels": 128,
            "res2net_scale": 8,
            "se_channels": 128,
            "global_context": True,
        },
        "resnet34": {"base_dim": 16, "layers": (3, 4, 6, 3)},
    }


def validate(m: ml_collections.ConfigDict, fail) -> None:
    """Checks `config.model`; `fail(key, message)` raises."""
    for key, value, choices in (
        ("encoder", m.encoder, ENCODERS),
        ("dtype", m.dtype, DTYPES),
        ("mel.window", m.mel.window, WINDOWS),
    ):
        if value not in choices:
            fail(f"model.{key}", f"must be one of {choices}, got {value!r}")
    if m.mel.win_length > m.mel.n_fft:
        fail("model.mel.win_length", f"{m.mel.win_length} exceeds n_fft {m.mel.n_fft}")
    for key in ("n_mels", "hop_length"):
        if m.mel[key] <= 0:
            fail(f"model.mel.{key}", f"must be > 0, got {m.mel[key]}")
    if m.encoder == "ecapa_tdnn":
        e = m.ecapa_tdnn
        n = len(e.channels)
        if n < 3:
            fail("model.ecapa_tdnn.channels", f"needs at least 3 entries, got {tuple(e.channels)}")
        for key in ("kernel_sizes", "dilations"):
            if len(e[key]) != n:
                fail(f"model.ecapa_tdnn.{key}", f"needs {n} entries (one per channel entry), got {tuple(e[key])}")
        for i, c in enumerate(e.channels[1:-1], start=1):
            if c % e.res2net_scale:
                fail(
                    "model.ecapa_tdnn.channels", f"entry {i} ({c}) is not divisible by res2net_scale {e.res2net_scale}"
                )
    else:
        r = m.resnet34
        if len(r.layers) != 4 or r.base_dim < 8:
            fail("model.resnet34", f"needs 4 layer counts and base_dim >= 8, got {tuple(r.layers)}, {r.base_dim}")


def build_encoder(model: ml_collections.ConfigDict, bn_axis_name: str | None = None, bn_groups: int = 1):
    """The encoder described by `config.model` (waveform in, embedding out).

    `bn_groups`: the training batches it will see stack that many views, each normalised alone
    (layers.batch_norm).
    """
    mel = LogMelConfig(**model.mel)
    common = dict(
        mel=mel,
        encoder_dim=model.encoder_dim,
        dtype=jnp.dtype(model.dtype),
        bn_axis_name=bn_axis_name,
        bn_groups=bn_groups,
    )
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
