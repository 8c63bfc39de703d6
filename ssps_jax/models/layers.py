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

from ssps_jax import ops

# PyTorch's default nn.Linear / nn.Conv initialisation (kaiming_uniform with a=sqrt(5)).
torch_default_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def batch_norm(train: bool, axis_name: str | None, dtype, name: str | None = None) -> nn.BatchNorm:
    """BatchNorm with PyTorch's hyper-parameters (momentum 0.1, eps 1e-5).

    During training, statistics are over the *global* batch: `axis_name` is the
    device axis of the shard_map the train step runs in (synchronised BN, as
    sslsv under DDP with SyncBatchNorm).
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        axis_name=axis_name if train else None,
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

    @nn.compact
    def __call__(self, x, lengths=None, train: bool = False, context=None):
        conv = Conv1dReflect(self.features, self.kernel_size, self.dilation, dtype=self.dtype, name="conv")
        return batch_norm(train, self.bn_axis_name, self.dtype, name="norm")(nn.relu(conv(x, lengths, context)))


Dense = functools.partial(nn.Dense, kernel_init=torch_default_init)
