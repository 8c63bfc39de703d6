"""Building blocks shared by the encoders and heads.

Initialisers follow PyTorch's defaults (sslsv's), so that training starts
from the same distribution as the reference: weights U(-1/sqrt(fan_in),
1/sqrt(fan_in)); biases start at zero (PyTorch draws them from the same
uniform; the difference does not matter in practice and keeps biases out of
the RNG stream).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from ssps_jax import ops

# PyTorch's default nn.Linear / nn.Conv initialisation (kaiming_uniform with a=sqrt(5)).
torch_default_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class BatchNorm(nn.Module):
    """flax's nn.BatchNorm over the last axis (its variables, initialisation and arithmetic), with `groups`.

    `groups` > 1 (training): the batch is that many equal groups stacked along
    axis 0 (the views of a Siamese method run through the encoder in one
    call, `methods.common.Siamese`), and each group is normalised by its own
    statistics, the running averages updated group after group: what one
    call per group computes (sslsv's encoder sees one view at a time), while
    every other layer runs once on all the groups. flax's BatchNorm has no
    groups, and calling it once per group costs more bytes than the one call
    saves (slices and concatenations XLA does not fuse: docs/performance.md),
    hence this module; the statistics are flax's (E[x^2] - E[x]^2 in float32 at least,
    clipped at 0, one pmean of both over `axis_name`).
    """

    use_running_average: bool
    axis_name: str | None = None
    groups: int = 1
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (features,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (features,))
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        dtype = self.dtype if self.dtype is not None else jnp.result_type(x, jnp.float32)
        if self.use_running_average:
            return ((x - ra_mean.value) * (lax.rsqrt(ra_var.value + self.epsilon) * scale) + bias).astype(dtype)
        if x.shape[0] % self.groups:
            raise ValueError(f"BatchNorm {self.name}: a batch of {x.shape[0]} is not {self.groups} equal groups")
        grouped = x.reshape(self.groups, x.shape[0] // self.groups, *x.shape[1:])
        axes = tuple(range(1, grouped.ndim - 1))
        wide = grouped.astype(jnp.promote_types(x.dtype, jnp.float32))  # float32 at least, float64 stays
        mean, mean2 = wide.mean(axes), jnp.square(wide).mean(axes)  # (groups, features)
        if self.axis_name is not None and not self.is_initializing():
            mean, mean2 = lax.pmean(jnp.stack([mean, mean2]), self.axis_name)
        var = jnp.maximum(0.0, mean2 - jnp.square(mean))
        if not self.is_initializing():
            m = self.momentum
            running_mean, running_var = ra_mean.value, ra_var.value
            for g in range(self.groups):
                running_mean = m * running_mean + (1 - m) * mean[g]
                running_var = m * running_var + (1 - m) * var[g]
            ra_mean.value, ra_var.value = running_mean, running_var
        shape = (self.groups,) + (1,) * len(axes) + (features,)
        y = (grouped - mean.reshape(shape)) * (lax.rsqrt(var + self.epsilon) * scale).reshape(shape) + bias
        return y.astype(dtype).reshape(x.shape)


def batch_norm(train: bool, axis_name: str | None, dtype, name: str | None = None, groups: int = 1) -> BatchNorm:
    """BatchNorm with PyTorch's hyper-parameters (momentum 0.1, eps 1e-5).

    During training, statistics are over the *global* batch: `axis_name` is the
    device axis of the shard_map the train step runs in (synchronised BN, as
    sslsv under DDP with SyncBatchNorm); with `groups`, over each group of it
    (`BatchNorm`).
    """
    return BatchNorm(
        use_running_average=not train,
        axis_name=axis_name if train else None,
        groups=groups,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        name=name,
    )


class ContextConv(nn.Module):
    """A kernel-size-1 nn.Conv of concatenate([x, context broadcast over time]), without the concatenation.

    x (B, T, C), context (B, D): x @ W[:C] + context @ W[C:] + b, the context's
    product made once per sequence instead of once per frame, and no (B, T,
    C + D) array written or read (in ECAPA-TDNN's attentive pooling, D = 2C:
    docs/performance.md). The parameters are the nn.Conv's it stands for
    (`kernel` (1, C + D, F), `bias`), with its initialisation and dtype rules.
    """

    features: int
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]
        kernel = self.param("kernel", torch_default_init, (1, c + context.shape[-1], self.features), jnp.float32)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, context, kernel, bias = promote_dtype(x, context, kernel, bias, dtype=self.dtype)
        y = x @ kernel[0, :c] + (context @ kernel[0, c:])[:, None, :]
        return y if bias is None else y + bias


class Conv1dReflect(nn.Module):
    """1-D convolution with 'same' reflect padding (sslsv's Conv1dSamePaddingReflect).

    Works on (B, T, C); with `lengths`, each sequence is reflected at its own end.
    With `context` (B, D) (kernel size 1 only), the input is x with the context
    concatenated to every frame's channels (`ContextConv`).
    """

    features: int
    kernel_size: int
    dilation: int = 1
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, lengths: jnp.ndarray | None = None, context: jnp.ndarray | None = None
    ) -> jnp.ndarray:
        if context is not None:
            if self.kernel_size != 1:
                raise ValueError(f"a per-sequence context needs kernel_size 1, got {self.kernel_size}")
            return ContextConv(self.features, self.use_bias, self.dtype, name="conv")(x, context)
        x = ops.reflect_pad(x, self.dilation * (self.kernel_size - 1) // 2, lengths)
        return nn.Conv(
            self.features,
            (self.kernel_size,),
            kernel_dilation=self.dilation,
            padding="VALID",
            use_bias=self.use_bias,
            dtype=self.dtype,
            kernel_init=torch_default_init,
            name="conv",
        )(x)


class TDNNBlock(nn.Module):
    """Conv -> ReLU -> BatchNorm (that order, as in SpeechBrain and sslsv)."""

    features: int
    kernel_size: int
    dilation: int = 1
    dtype: jnp.dtype = jnp.float32
    bn_axis_name: str | None = None
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, lengths=None, train: bool = False, context=None):
        conv = Conv1dReflect(self.features, self.kernel_size, self.dilation, dtype=self.dtype, name="conv")
        norm = batch_norm(train, self.bn_axis_name, self.dtype, name="norm", groups=self.bn_groups)
        return norm(nn.relu(conv(x, lengths, context)))


Dense = functools.partial(nn.Dense, kernel_init=torch_default_init)
