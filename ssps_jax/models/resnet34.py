"""Fast ResNet-34 (sslsv's `resnet34`): a thin ResNet on log-mels with self-attentive pooling.

Module names mirror sslsv's (`conv`, `bn`, `block1_0` ... `block4_2`, `pooling`,
`fc`). Layout is (batch, mel, time, channels); convolutions are zero-padded,
so with `lengths` the padded frames are zeroed before every convolution and
pooling skips them, which makes a padded batch embed exactly like each
utterance alone.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ssps_jax import ops
from ssps_jax.features import LogMelConfig, log_mel
from ssps_jax.models.layers import Dense, batch_norm

# sslsv initialises its ResNet convolutions with kaiming_normal(fan_out, relu).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _time_mask(lengths, size):
    """(B, 1, T, 1) float mask, or None."""
    mask = ops.sequence_mask(lengths, size)
    return None if mask is None else mask[:, None, :, None]


def _zero_padding(x, lengths):
    mask = _time_mask(lengths, x.shape[2])
    return x if mask is None else x * mask.astype(x.dtype)


def _strided(lengths, stride):
    """Valid length after a 'same'-padded convolution of this time stride."""
    return None if lengths is None else (lengths + stride - 1) // stride


class SELayer(nn.Module):
    reduction: int = 8
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, lengths=None):
        c = x.shape[-1]
        mask = _time_mask(lengths, x.shape[2])
        if mask is None:
            s = jnp.mean(x, axis=(1, 2))
        else:
            s = jnp.sum(x * mask, axis=(1, 2)) / (x.shape[1] * lengths[:, None])
        s = nn.relu(Dense(c // self.reduction, dtype=self.dtype, name="fc_0")(s))
        s = nn.sigmoid(Dense(c, dtype=self.dtype, name="fc_2")(s))
        return x * s[:, None, None, :]


class ResNetBlock(nn.Module):
    features: int
    stride: int
    dtype: jnp.dtype = jnp.float32
    bn_axis_name: str | None = None
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, lengths=None, train=False):
        def conv(features, kernel, stride, name):
            pad = (kernel - 1) // 2
            return nn.Conv(
                features,
                (kernel, kernel),
                strides=stride,
                padding=((pad, pad), (pad, pad)),
                use_bias=False,
                dtype=self.dtype,
                kernel_init=_conv_init,
                name=name,
            )

        def bn(name):
            return batch_norm(train, self.bn_axis_name, self.dtype, name=name, groups=self.bn_groups)

        x = _zero_padding(x, lengths)
        residual = x
        if self.stride != 1 or x.shape[-1] != self.features:
            residual = bn("downsample_1")(conv(self.features, 1, self.stride, "downsample_0")(x))
        out_lengths = _strided(lengths, self.stride)
        z = bn("bn1")(nn.relu(conv(self.features, 3, self.stride, "conv1")(x)))
        z = bn("bn2")(conv(self.features, 3, 1, "conv2")(_zero_padding(z, out_lengths)))
        z = SELayer(dtype=self.dtype, name="se")(z, out_lengths)
        return nn.relu(z + residual), out_lengths


class SelfAttentivePooling(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, lengths=None):
        x = jnp.mean(x, axis=1)  # average the frequency axis: (B, T, C)
        attention = self.param("attention", nn.initializers.xavier_normal(), (x.shape[-1], 1))
        scores = jnp.tanh(Dense(x.shape[-1], dtype=self.dtype, name="sap_linear")(x)) @ attention
        weights = ops.masked_softmax(scores.astype(jnp.float32), ops.sequence_mask(lengths, x.shape[1]), axis=1)
        return jnp.sum(x.astype(jnp.float32) * weights, axis=1)


class ResNet34(nn.Module):
    """Waveforms (B, n) -> speaker embeddings (B, encoder_dim)."""

    mel: LogMelConfig = LogMelConfig(n_mels=40)
    base_dim: int = 16
    layers: tuple[int, ...] = (3, 4, 6, 3)
    encoder_dim: int = 512
    dtype: jnp.dtype = jnp.float32
    bn_axis_name: str | None = None
    bn_groups: int = 1

    @nn.compact
    def __call__(self, wave, lengths=None, train: bool = False):
        x, lengths = log_mel(wave, self.mel, lengths)
        x = jnp.swapaxes(x, 1, 2)[..., None].astype(self.dtype)  # (B, mel, T, 1)
        x = nn.Conv(
            self.base_dim,
            (7, 7),
            strides=(2, 1),
            padding=((3, 3), (3, 3)),
            use_bias=False,
            dtype=self.dtype,
            kernel_init=_conv_init,
            name="conv",
        )(_zero_padding(x, lengths))
        x = nn.relu(batch_norm(train, self.bn_axis_name, self.dtype, name="bn", groups=self.bn_groups)(x))
        widths = (1, 2, 4, 8)
        strides = (1, 2, 2, 1)
        for stage, (n_blocks, width, stride) in enumerate(zip(self.layers, widths, strides), start=1):
            for i in range(n_blocks):
                block = ResNetBlock(
                    self.base_dim * width,
                    stride if i == 0 else 1,
                    self.dtype,
                    self.bn_axis_name,
                    self.bn_groups,
                    name=f"block{stage}_{i}",
                )
                x, lengths = block(x, lengths, train)
        x = SelfAttentivePooling(self.dtype, name="pooling")(x, lengths)
        return Dense(self.encoder_dim, name="fc")(x).astype(jnp.float32)
