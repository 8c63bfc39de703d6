"""Heads on top of the encoder: sslsv's siamese projector, and the weight-normalised linear layer of DINO's
head and SwAV's prototypes."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ssps_jax.models.layers import Dense, batch_norm, torch_default_init


class Projector(nn.Module):
    """sslsv's siamese projector: (Linear-BN-ReLU) x 2, then Linear; with `hidden_layers` 1, BYOL's predictor.

    Layer names carry the index they have in sslsv's nn.Sequential.
    """

    hidden_dim: int
    output_dim: int
    dtype: jnp.dtype = jnp.float32
    bn_axis_name: str | None = None
    bn_groups: int = 1
    hidden_layers: int = 2

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i in range(self.hidden_layers):
            x = Dense(self.hidden_dim, dtype=self.dtype, name=f"layers_{3 * i}")(x)
            norm = batch_norm(train, self.bn_axis_name, self.dtype, name=f"layers_{3 * i + 1}", groups=self.bn_groups)
            x = nn.relu(norm(x))
        return Dense(self.output_dim, dtype=self.dtype, name=f"layers_{3 * self.hidden_layers}")(x).astype(jnp.float32)


class WeightNormDense(nn.Module):
    """Linear layer without bias whose weight rows have unit norm (weight_norm with g fixed at 1).

    sslsv: nn.utils.weight_norm(nn.Linear(..., bias=False)) with weight_g filled with 1
    and frozen, so the effective weight is v / ||v|| per output unit.
    """

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        v = self.param("weight_v", torch_default_init, (x.shape[-1], self.features))  # (in, out)
        # The norm in float32 at least: in a bfloat16 step v arrives in bfloat16 (update_sharding.gather).
        norm = jnp.linalg.norm(v.astype(jnp.promote_types(v.dtype, jnp.float32)), axis=0, keepdims=True)
        w = v / jnp.maximum(norm, 1e-12)
        return jnp.dot(x.astype(self.dtype), w.astype(self.dtype))
