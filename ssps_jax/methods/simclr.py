"""SimCLR (Chen et al., 2020) for speaker embeddings, as sslsv trains it (docs/method.md §6).

Each view goes through the encoder in its own call, so BatchNorm statistics
are per view over the global batch, exactly like sslsv's two encoder calls
under DDP with synchronised BN. The loss is NT-Xent over both views of the
global batch, the negatives gathered from every device.

With SSPS the positive branch is view 2: its embedding z' is what the
positive queue holds, and a pseudo-positive replaces it before the loss.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from ssps_jax.methods.base import Fail, Method, check_kmeans_positive, output_dim, projector_dims, views_input
from ssps_jax.models import build_encoder
from ssps_jax.models.heads import Projector
from ssps_jax.sharding import DATA
from ssps_jax.ssps import step as ssps_step
from ssps_jax.train_step import apply_gradients, reference_and_positives


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


def siamese_model(
    config: ml_collections.ConfigDict, section: ml_collections.ConfigDict, bn_axis_name: str | None = None
) -> SimCLR:
    """Encoder + the optional projector of `section` (SimCLR's, VICReg's, MoCo's: the same module tree)."""
    return SimCLR(
        encoder=build_encoder(config.model, bn_axis_name),
        projector_dims=projector_dims(section),
        dtype=jnp.dtype(config.model.dtype),
        bn_axis_name=bn_axis_name,
    )


@dataclasses.dataclass(frozen=True)
class SimCLRSettings:
    temperature: float


class SimCLRMethod(Method):
    name = "simclr"
    summary = "SimCLR: NT-Xent temperature, optional projector"
    crop_mode = "siamese"

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
        check_kmeans_positive(config, fail, "simclr", "a projector output")

    def build_model(self, config: ml_collections.ConfigDict, bn_axis_name: str | None = None) -> SimCLR:
        return siamese_model(config, config.simclr, bn_axis_name)

    def example_input(self, config: ml_collections.ConfigDict) -> jax.ShapeDtypeStruct:
        return views_input(config.data.crops.frame_seconds)

    def settings(self, config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> SimCLRSettings:
        return SimCLRSettings(temperature=config.simclr.temperature)

    def positive_shape(self, config: ml_collections.ConfigDict) -> tuple[int, int]:
        return 1, output_dim(config, config.simclr)

    def step(self, state, batch, rng, *, model, tx, settings: SimCLRSettings, ssps=None):
        """One SimCLR (or SimCLR-SSPS) step on this device's examples (call inside shard_map)."""
        # This device's randomness: the step key folded with the device index.
        device_rng = jax.random.fold_in(rng, lax.axis_index(DATA))
        metrics = {}
        if ssps is not None:
            encoder = {"params": state.params, "batch_stats": state.batch_stats}
            y_ref, positives, mask, metrics = reference_and_positives(model, encoder, state, batch, rng, ssps)

        def loss_fn(params):
            (z1, z2), updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                batch["views"],
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": device_rng},  # for stochastic layers; the encoders here have none
            )
            z2_used = z2 if ssps is None else jnp.where(mask[:, None], positives[0].astype(z2.dtype), z2)
            return nt_xent(z1, z2_used, settings.temperature, axis_name=DATA), (updates["batch_stats"], z2)

        (loss, (batch_stats, z2)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        params, opt_state, grad_norm = apply_gradients(state, grads, tx)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,  # already identical on every device (synchronised BN)
            opt_state=opt_state,
        )
        if ssps is not None:
            queues = ssps_step.enqueue(state.ssps, state.step, ssps.steps_per_epoch, batch["index"], y_ref, z2[None])
            new_state = new_state.replace(ssps=queues)
        metrics.update(loss=lax.pmean(loss, DATA), grad_norm=grad_norm)
        return new_state, metrics


METHOD = SimCLRMethod()
