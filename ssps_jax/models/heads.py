"""Heads on top of the encoder."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ssps_jax.models.layers import Dense, batch_norm


class Projector(nn.Module):
    """sslsv's siamese projector: (Linear-BN-ReLU) x 2, then Linear.

    Layer names carry the index they have in sslsv's nn.Sequential.
    """

    hidden_dim: int
    output_dim: int
    dtype: jnp.dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        for dense, bn in ((0, 1), (3, 4)):
            x = Dense(self.hidden_dim, dtype=self.dtype, name=f"layers_{dense}")(x)
            x = nn.relu(batch_norm(train, self.bn_axis_name, self.dtype, name=f"layers_{bn}")(x))
        return Dense(self.output_dim, dtype=self.dtype, name="layers_6")(x).astype(jnp.float32)
