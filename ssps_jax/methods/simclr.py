"""SimCLR (Chen et al., 2020) for speaker embeddings, as sslsv trains it.

Each view goes through the encoder in its own call, so BatchNorm statistics
are per view over the global batch, exactly like sslsv's two encoder calls
under DDP with synchronised BN.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ssps_jax.models.heads import Projector


class SimCLR(nn.Module):
    """Encoder (+ optional projector) applied to each of two views."""

    encoder: nn.Module
    projector_dims: tuple[int, int] | None = None  # (hidden, output); None: no projector
    dtype: jnp.dtype = jnp.float32
    bn_axis_name: str | None = None

    def setup(self):
        if self.projector_dims is not None:
            self.projector = Projector(*self.projector_dims, dtype=self.dtype, bn_axis_name=self.bn_axis_name)

    def __call__(self, views: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
        """views (B, 2, n) -> embeddings of view 1 and view 2, each (B, D)."""
        out = []
        for v in range(2):
            y = self.encoder(views[:, v], train=train)
            out.append(self.projector(y, train=train) if self.projector_dims is not None else y)
        return out[0], out[1]

    def embed(self, wave: jnp.ndarray, lengths: jnp.ndarray | None = None) -> jnp.ndarray:
        """Speaker embeddings for evaluation: the encoder output in inference mode."""
        return self.encoder(wave, lengths, train=False)


def nt_xent(z1: jnp.ndarray, z2: jnp.ndarray, temperature: float, axis_name: str | None = None) -> jnp.ndarray:
    """NT-Xent of this device's anchors against the views of the whole global batch.

    z1, z2: (n, D) embeddings of the two views of this device's n examples.
    Every one of the 2n local embeddings is an anchor; its positive is the
    other view of the same example; its negatives are all other 2N - 2
    embeddings of the global batch (N = n x devices), gathered over
    `axis_name`. Returns the mean over local anchors; the mean of that over
    devices (a pmean) is the loss of the global batch.
    """
    z = jnp.concatenate([z1, z2], axis=0).astype(jnp.float32)
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    n2 = z.shape[0]
    if axis_name is None:
        everyone, offset = z, 0
    else:
        everyone = lax.all_gather(z, axis_name, tiled=True)  # (2N, D), device blocks in order
        offset = lax.axis_index(axis_name) * n2
    logits = z @ everyone.T / temperature  # (2n, 2N)
    rows = jnp.arange(n2)
    own = offset + rows
    positive = offset + (rows + n2 // 2) % n2
    logits = logits.at[rows, own].set(-jnp.inf)  # an anchor is not its own negative
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[rows, positive])
