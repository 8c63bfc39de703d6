"""SimCLR (Chen et al., 2020) for speaker embeddings, as sslsv trains it (docs/method.md §6).

The model is methods/common.py's siamese one: each view goes through the
encoder (and the optional projector) in its own call, so BatchNorm
statistics are per view over the global batch, exactly like sslsv's two
encoder calls under DDP with synchronised BN. The loss is NT-Xent over both
views of the global batch, the negatives gathered from every device.

With SSPS the positive branch is view 2: its embedding z' is what the
positive queue holds, and a pseudo-positive replaces it before the loss.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from ssps_jax.methods.base import Fail
from ssps_jax.methods.common import SiameseMethod
from ssps_jax.sharding import DATA


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


@dataclasses.dataclass(frozen=True)
class SimCLRSettings:
    temperature: float


class SimCLRMethod(SiameseMethod):
    name = "simclr"
    title = "SimCLR"
    summary = "SimCLR: NT-Xent temperature, optional projector"
    demo_config = "demo_ssps.py"

    def default_config(self) -> dict:
        return {
            "temperature": 0.03,
            "projector": False,  # the SSPS paper's SimCLR has none
            "projector_hidden_dim": 2048,
            "projector_output_dim": 128,
        }

    def validate(self, config: ml_collections.ConfigDict, fail: Fail) -> None:
        s = config.simclr
        if s.temperature <= 0:
            fail("simclr.temperature", f"must be > 0, got {s.temperature}")

    def settings(self, config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> SimCLRSettings:
        return SimCLRSettings(temperature=config.simclr.temperature)

    def loss(self, outputs, positive, *, settings: SimCLRSettings, **_):
        return nt_xent(outputs[0], positive[0], settings.temperature, axis_name=DATA), {}


METHOD = SimCLRMethod()
