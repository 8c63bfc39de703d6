"""SwAV (Caron et al., 2020) for speaker embeddings, as sslsv trains it (docs/method.md §6.6).

Each view goes through the encoder and sslsv's siamese projector in its own
call (BatchNorm statistics per view over the global batch); the outputs are
L2-normalised (z1, z2) and scored against K prototypes, a bias-free linear
layer whose weight rows have unit norm (`models.heads.WeightNormDense`, as DINO's last layer). Each
view's codes are Sinkhorn-Knopp's equal-partition assignment of its scores
over the global batch (and, from `queue_start_epoch` on, over the feature
queue's rows too); the loss swaps them: the codes of one view are the target
of the temperature softmax of the other view's scores. The prototypes do not
move during the first `freeze_prototypes_epochs` epochs (the optimizer).

The feature queue holds the last batches' z1 and z2 (as sslsv, each device
its own slice): it is laid out like the SSPS queues, (2 views, C / G
blocks, G rows, D) split over devices along the rows, the batch of step s
in block s mod (C / G). It starts at zeros, as sslsv's.

With SSPS the positive branch is view 2, as in sslsv's SwAV: the
pseudo-positive replaces z2 before scoring (so its scores and codes are the
pseudo-positive's), the positive queue receives the original z2, and so
does the feature queue (sslsv queues the views it embedded).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax import lax
from jax.sharding import PartitionSpec as P

from ssps_jax.methods.base import Fail
from ssps_jax.methods.common import SiameseMethod, normalise, output_dim, projector_dims
from ssps_jax.models import build_encoder
from ssps_jax.models.heads import Projector, WeightNormDense
from ssps_jax.optim import make_optimizer
from ssps_jax.sharding import DATA


class SwAV(nn.Module):
    """Encoder, optional projector, prototypes (sslsv's names: `projector`, `prototypes`)."""

    encoder: nn.Module
    projector_dims: tuple[int, int] | None
    n_prototypes: int
    dtype: jnp.dtype = jnp.float32
    bn_axis_name: str | None = None

    def setup(self):
        if self.projector_dims is not None:
            self.projector = Projector(*self.projector_dims, dtype=self.dtype, bn_axis_name=self.bn_axis_name)
        self.prototypes = WeightNormDense(self.n_prototypes, dtype=self.dtype)

    def __call__(self, views: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
        """views (B, 2, n) -> the L2-normalised projector outputs of view 1 and view 2, each (B, D)."""
        out = []
        for v in range(2):
            y = self.encoder(views[:, v], train=train)
            out.append(normalise(self.projector(y, train=train) if self.projector_dims is not None else y))
        if self.is_initializing():
            self.scores(out[0])  # creates the prototypes
        return out[0], out[1]

    def scores(self, z: jnp.ndarray) -> jnp.ndarray:
        """Cosines of unit rows z (..., D) with the K prototypes: (..., K)."""
        return self.prototypes(z).astype(z.dtype)

    def embed(self, wave: jnp.ndarray, lengths: jnp.ndarray | None = None) -> jnp.ndarray:
        return self.encoder(wave, lengths, train=False)


def sinkhorn(scores: jnp.ndarray, iterations: int, epsilon: float, axis_name: str | None = None) -> jnp.ndarray:
    """Sinkhorn-Knopp codes (b, K) of this device's rows, the equal partition taken over every device's rows.

    Q = exp(scores / epsilon), then `iterations` times: each prototype's total
    weight over the whole batch (all devices) set to 1 / K, then each row's to
    1 / B (B = rows of all devices); finally rows rescaled to sum to 1. The
    global maximum is subtracted first (it cancels in the normalisations).
    """
    scores = lax.stop_gradient(scores)
    b, k = scores.shape

    def total(x):
        return x if axis_name is None else lax.psum(x, axis_name)

    top = jnp.max(scores) if axis_name is None else lax.pmax(jnp.max(scores), axis_name)
    q = jnp.exp((scores - top) / epsilon)
    rows = total(b)
    q = q / total(jnp.sum(q))
    for _ in range(iterations):
        q = q / (total(jnp.sum(q, axis=0, keepdims=True)) * k)  # per prototype: 1 / K
        q = q / (jnp.sum(q, axis=1, keepdims=True) * rows)  # per row: 1 / B
    return q * rows


def swapped_loss(scores: jnp.ndarray, codes: jnp.ndarray, temperature: float) -> jnp.ndarray:
    """Mean over (codes i, scores j), i != j, of the batch-mean cross-entropy -sum_k codes_i log softmax(scores_j / T).

    scores, codes (V, n, K) of this device's rows; the pmean over devices is the global batch's loss.
    """
    log_p = jax.nn.log_softmax(scores / temperature, axis=-1)
    cross = -jnp.einsum("ink,jnk->ij", codes, log_p) / scores.shape[1]  # (V, V) batch means
    v = cross.shape[0]
    return jnp.sum(jnp.where(~jnp.eye(v, dtype=bool), cross, 0.0)) / (v * v - v)


@dataclasses.dataclass(frozen=True)
class SwAVSettings:
    temperature: float
    sinkhorn_iterations: int
    sinkhorn_epsilon: float
    queue_start_epoch: int
    steps_per_epoch: int


class SwAVMethod(SiameseMethod):
    name = "swav"
    title = "SwAV"
    summary = "SwAV: prototypes, Sinkhorn-Knopp, temperature, feature queue, optional projector"
    demo_config = "demo_swav_ssps.py"
    sslsv_not_imported = ("queue",)

    @property
    def sslsv_sizes(self) -> dict[str, str]:
        return {**super().sslsv_sizes, "prototypes": "swav.prototypes"}

    def default_config(self) -> dict:
        return {  # sslsv's SwAV defaults (the SSPS experiments use a 2048-512 projector: configs/swav_*.py)
            "temperature": 0.1,
            "prototypes": 3000,
            "sinkhorn_iterations": 3,
            "sinkhorn_epsilon": 0.05,
            "queue_size": 3840,  # rounded down to a multiple of the global batch; 0: no queue
            "queue_start_epoch": 15,
            "freeze_prototypes_epochs": 1,
            "projector": True,
            "projector_hidden_dim": 2048,
            "projector_output_dim": 128,
        }

    def validate(self, config: ml_collections.ConfigDict, fail: Fail) -> None:
        s = config.swav
        for key in ("temperature", "sinkhorn_epsilon"):
            if s[key] <= 0:
                fail(f"swav.{key}", f"must be > 0, got {s[key]}")
        if s.prototypes < 2:
            fail("swav.prototypes", f"must be >= 2, got {s.prototypes}")
        for key in ("sinkhorn_iterations", "queue_start_epoch", "freeze_prototypes_epochs"):
            if s[key] < 0:
                fail(f"swav.{key}", f"must be >= 0, got {s[key]}")
        if 0 < s.queue_size < config.train.global_batch_size:
            fail("swav.queue_size", f"{s.queue_size} is smaller than one global batch (0 turns the queue off)")
        if s.queue_size < 0:
            fail("swav.queue_size", f"must be >= 0, got {s.queue_size}")

    def build_model(self, config: ml_collections.ConfigDict, bn_axis_name: str | None = None) -> SwAV:
        s = config.swav
        return SwAV(
            encoder=build_encoder(config.model, bn_axis_name),
            projector_dims=projector_dims(s),
            n_prototypes=s.prototypes,
            dtype=jnp.dtype(config.model.dtype),
            bn_axis_name=bn_axis_name,
        )

    def build_optimizer(self, config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int):
        """sslsv's optimizer with the prototypes frozen for `swav.freeze_prototypes_epochs`."""
        return make_optimizer(
            config.optim, steps_per_epoch, total_steps, "prototypes", config.swav.freeze_prototypes_epochs
        )

    def settings(self, config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> SwAVSettings:
        s = config.swav
        return SwAVSettings(
            temperature=s.temperature,
            sinkhorn_iterations=s.sinkhorn_iterations,
            sinkhorn_epsilon=s.sinkhorn_epsilon,
            # No queue: never used (a queue of one empty block is kept so the state has one layout).
            queue_start_epoch=s.queue_start_epoch if s.queue_size > 0 else 2**31 - 1,
            steps_per_epoch=steps_per_epoch,
        )

    def init_state(self, config: ml_collections.ConfigDict, variables: dict) -> dict:
        batch = config.train.global_batch_size
        blocks = max(config.swav.queue_size // batch, 1)
        return {"queue": jnp.zeros((2, blocks, batch, output_dim(config, config.swav)), jnp.float32)}

    def state_specs(self, state: dict) -> dict:
        """The feature queue split along its rows, like the SSPS queues."""
        return {"queue": P(None, None, DATA)}

    def loss(self, outputs, positive, *, variables, state, model, settings: SwAVSettings, **_):
        """The swapped prediction of z1 and of the positive branch (z2, or its pseudo-positive)."""
        s = settings
        queue = state.method_state["queue"]
        use_queue = state.step // s.steps_per_epoch >= s.queue_start_epoch

        def codes_of(scores, queue_scores):
            """Sinkhorn codes of this device's rows, over the batch alone or the batch and the queue."""
            n = scores.shape[0]
            alone = sinkhorn(scores, s.sinkhorn_iterations, s.sinkhorn_epsilon, DATA)
            both = sinkhorn(jnp.concatenate([scores, queue_scores]), s.sinkhorn_iterations, s.sinkhorn_epsilon, DATA)
            return jnp.where(use_queue, both[:n], alone)

        scores = jnp.stack([model.apply(variables, z, method=type(model).scores) for z in (outputs[0], positive[0])])
        flat_queue = lax.stop_gradient(queue).reshape(2, -1, queue.shape[-1]).astype(scores.dtype)
        queue_scores = model.apply(variables, flat_queue, method=type(model).scores)  # (2, rows, K)
        codes = jnp.stack([codes_of(scores[v], queue_scores[v]) for v in range(2)])
        return swapped_loss(scores, codes, s.temperature), {}

    def update(self, state, params, outputs, positive, target, *, settings: SwAVSettings):
        """The views it embedded (z1, z2) into the feature queue's block (step mod blocks)."""
        queue = state.method_state["queue"]
        embedded = lax.stop_gradient(jnp.stack(outputs)).astype(queue.dtype)
        return {"queue": lax.dynamic_update_index_in_dim(queue, embedded, state.step % queue.shape[1], axis=1)}, {}


METHOD = SwAVMethod()
