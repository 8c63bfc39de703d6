"""ECAPA-TDNN (Desplanques et al., 2020) as in SpeechBrain and sslsv.

The module tree mirrors sslsv's `sslsv.encoders.ECAPATDNN` one to one (see
docs/sslsv_parameter_mapping.md): `blocks_0` (TDNN), `blocks_1..3`
(SE-Res2Net), `mfa`, `asp`, `asp_bn`, `fc`. Layout is (batch, time, channels).

Every time-wise operation honours `lengths` (valid frames per sequence), so a
batch padded to a bucket length embeds exactly like each utterance alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssps_jax import ops
from ssps_jax.features import LogMelConfig, log_mel
from ssps_jax.models.layers import Conv1dReflect, TDNNBlock, batch_norm


class Res2NetBlock(nn.Module):
    features: int
    scale: int
    kernel_size: int
    dilation: int
    dtype: jnp.dtype = jnp.float32
    bn_axis_name: str | None = None
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, lengths=None, train=False):
        chunks = jnp.split(x, self.scale, axis=-1)
        out = [chunks[0]]
        y = None
        for i, chunk in enumerate(chunks[1:]):
            block = TDNNBlock(
                self.features // self.scale,
                self.kernel_size,
                self.dilation,
                self.dtype,
                self.bn_axis_name,
                self.bn_groups,
                name=f"blocks_{i}",
            )
            y = block(chunk if y is None else chunk + y, lengths, train)
            out.append(y)
        return jnp.concatenate(out, axis=-1)


class SEBlock(nn.Module):
    """Squeeze-and-excitation over time: channel gates from the mean frame."""

    se_channels: int
    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, lengths=None):
        s = ops.masked_mean(x, ops.sequence_mask(lengths, x.shape[1]), axis=1, keepdims=True)
        s = nn.relu(Conv1dReflect(self.se_channels, 1, dtype=self.dtype, name="conv1")(s))
        s = nn.sigmoid(Conv1dReflect(self.features, 1, dtype=self.dtype, name="conv2")(s))
        return s * x


class SERes2NetBlock(nn.Module):
    features: int
    res2net_scale: int
    se_channels: int
    kernel_size: int
    dilation: int
    dtype: jnp.dtype = jnp.float32
    bn_axis_name: str | None = None
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, lengths=None, train=False):
        residual = x
        if x.shape[-1] != self.features:
            residual = Conv1dReflect(self.features, 1, dtype=self.dtype, name="shortcut")(x)
        tdnn = dict(dtype=self.dtype, bn_axis_name=self.bn_axis_name, bn_groups=self.bn_groups)
        x = TDNNBlock(self.features, 1, **tdnn, name="tdnn1")(x, lengths, train)
        x = Res2NetBlock(
            self.features, self.res2net_scale, self.kernel_size, self.dilation, **tdnn, name="res2net_block"
        )(x, lengths, train)
        x = TDNNBlock(self.features, 1, **tdnn, name="tdnn2")(x, lengths, train)
        x = SEBlock(self.se_channels, self.features, self.dtype, name="se_block")(x, lengths)
        return x + residual


_STD_EPS = 1e-12  # sslsv's clamp of the variance


def _masked_logits(logits, valid):
    """float32 logits, -inf past `valid` (masked before the exp: a product by the mask would give inf * 0)."""
    return jnp.where(valid, logits.astype(jnp.float32), -jnp.inf)


def _deviations_and_weights(x, logits, valid, peak):
    """float32 (x - first frame) and the unnormalised weights exp(logits - peak), zero past `valid`."""
    shift = x[:, :1].astype(jnp.float32)  # sliced before the cast: the cast of x fuses into the sums
    weights = valid.astype(jnp.float32) if logits is None else jnp.exp(_masked_logits(logits, valid) - peak)
    return shift, x.astype(jnp.float32) - shift, weights


def _pooled_stats_forward(x, logits, valid):
    peak = None if logits is None else jnp.max(_masked_logits(logits, valid), axis=1, keepdims=True)
    shift, d, weights = _deviations_and_weights(x, logits, valid, peak)
    total = jnp.sum(weights, axis=1)
    m1 = jnp.sum(weights * d, axis=1) / total
    m2 = jnp.sum(weights * jnp.square(d), axis=1) / total
    std = jnp.sqrt(jnp.maximum(m2 - jnp.square(m1), _STD_EPS))
    return (shift[:, 0] + m1, std), (x, logits, valid, peak, total, m1, m2, std)


@jax.custom_vjp
def pooled_stats(x, logits, valid):
    """Mean and std over time (axis 1) of the frames `x` (B, T, C), in float32 whatever their dtype.

    Weighted by the softmax over time of `logits` (B, T, C), or uniformly
    with `logits` None; frames where `valid` (B, T, 1) is false get zero
    weight. This is sslsv's _compute_statistics (mean = sum w x, std =
    sqrt(max(sum w (x - mean)^2, 1e-12))) computed for fewer bytes: one
    reduction over the frames gives the weights' sum and the first two
    moments (mean-then-variance and the softmax's own normalisation read
    the frames and logits three times more), and the backward pass is one
    elementwise expression of the frames and logits as they came (bf16 in a
    bf16 step), where autodiff saved float32 (B, T, C) weights and
    deviations (docs/performance.md). The moments are taken about the first
    frame (valid whatever the lengths), so that E[d^2] - E[d]^2 does not
    cancel when |mean| >> std. The padding's logits are masked before the
    exp (a product by the mask would give inf * 0 there).
    """
    return _pooled_stats_forward(x, logits, valid)[0]


def _pooled_stats_backward(residuals, cotangents):
    x, logits, valid, peak, total, m1, m2, std = residuals
    g_mean, g_std = cotangents
    # Through std = sqrt(max(var, eps)) and var = m2 - m1^2 (no gradient where the clamp holds).
    g_var = jnp.where(std * std > _STD_EPS, g_std / (2 * std), 0.0)
    g_m1 = g_mean - 2 * m1 * g_var  # mean = shift + m1, the shift being a constant of the statistics
    _, d, weights = _deviations_and_weights(x, logits, valid, peak)
    w = weights / total[:, None]  # the normalised weights
    m1, m2, g_m1, g_var = (a[:, None] for a in (m1, m2, g_m1, g_var))
    g_x = w * (g_m1 + 2 * g_var * d)
    if logits is None:
        return g_x.astype(x.dtype), None, None
    g_logits = w * (g_m1 * (d - m1) + g_var * (jnp.square(d) - m2))
    return g_x.astype(x.dtype), g_logits.astype(logits.dtype), None


pooled_stats.defvjp(_pooled_stats_forward, _pooled_stats_backward)


class AttentiveStatisticsPooling(nn.Module):
    """Attentive statistics pooling with global context -> (B, 2C)."""

    attention_channels: int
    global_context: bool = True
    dtype: jnp.dtype = jnp.float32
    bn_axis_name: str | None = None
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, lengths=None, train=False):
        size, channels = x.shape[1], x.shape[2]
        mask = ops.sequence_mask(lengths, size)
        valid = jnp.ones((x.shape[0], size, 1), bool) if mask is None else mask[..., None]
        context = None
        if self.global_context:  # mean and std over time, concatenated to every frame (by the conv: ContextConv)
            context = jnp.concatenate(pooled_stats(x, None, valid), -1).astype(x.dtype)
        common = dict(dtype=self.dtype, bn_axis_name=self.bn_axis_name, bn_groups=self.bn_groups)
        tdnn = TDNNBlock(self.attention_channels, 1, **common, name="tdnn")
        attn = tdnn(x, lengths, train, context=context)
        attn = Conv1dReflect(channels, 1, dtype=self.dtype, name="conv")(jnp.tanh(attn))
        return jnp.concatenate(pooled_stats(x, attn, valid), axis=-1)


class ECAPATDNN(nn.Module):
    """Waveforms (B, n) -> speaker embeddings (B, encoder_dim)."""

    mel: LogMelConfig = LogMelConfig(n_mels=80)
    channels: Sequence[int] = (512, 512, 512, 512, 1536)
    kernel_sizes: Sequence[int] = (5, 3, 3, 3, 1)
    dilations: Sequence[int] = (1, 2, 3, 4, 1)
    attention_channels: int = 128
    res2net_scale: int = 8
    se_channels: int = 128
    global_context: bool = True
    encoder_dim: int = 512
    dtype: jnp.dtype = jnp.float32
    bn_axis_name: str | None = None
    bn_groups: int = 1  # training batches stack this many views, each normalised alone (layers.batch_norm)

    @nn.compact
    def __call__(self, wave, lengths=None, train: bool = False):
        x, lengths = log_mel(wave, self.mel, lengths)
        x = x.astype(self.dtype)
        common = dict(dtype=self.dtype, bn_axis_name=self.bn_axis_name, bn_groups=self.bn_groups)
        outputs = []
        for i, (c, k, d) in enumerate(zip(self.channels[:-1], self.kernel_sizes, self.dilations)):
            if i == 0:
                block = TDNNBlock(c, k, d, **common, name="blocks_0")
            else:
                block = SERes2NetBlock(c, self.res2net_scale, self.se_channels, k, d, **common, name=f"blocks_{i}")
            x = block(x, lengths, train)
            outputs.append(x)
        # Multi-layer feature aggregation: every SE-Res2Net block's output.
        x = jnp.concatenate(outputs[1:], axis=-1)
        x = TDNNBlock(self.channels[-1], self.kernel_sizes[-1], self.dilations[-1], **common, name="mfa")(
            x, lengths, train
        )
        x = AttentiveStatisticsPooling(self.attention_channels, self.global_context, **common, name="asp")(
            x, lengths, train
        )
        asp_bn = batch_norm(train, self.bn_axis_name, self.dtype, name="asp_bn", groups=self.bn_groups)
        x = asp_bn(x.astype(self.dtype))
        x = Conv1dReflect(self.encoder_dim, 1, dtype=self.dtype, name="fc")(x[:, None, :])[:, 0]
        return x.astype(jnp.float32)
