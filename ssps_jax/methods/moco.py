"""MoCo v2+ (Chen et al., 2020) for speaker embeddings, as sslsv trains it (docs/method.md §6.5).

The query network is the siamese model (methods/common.py: encoder +
optional projector, each view in its own call); the key network has the same module tree and its own
variables in the method state (`momentum`): an EMA of the query parameters
(tau constant at start_tau unless `tau_scheduler`), with BatchNorm
statistics of its own, updated by its training-mode passes, as sslsv's
momentum encoder. Keys and queries are L2-normalised; each view's queries
are contrasted with the other view's keys (the positives) and with the
negative queue of that other view:

    loss = (InfoNCE(q1; k2, queue[1]) + InfoNCE(q2; k1, queue[0])) / 2

after which the batch's keys enter the queue. The queue (`queue`, initialised
with random unit rows as sslsv does) is laid out like the SSPS queues, (2
views, C / G blocks, G rows, D) split over devices along the rows: the batch
of step s goes into block s mod (C / G), each device writing its own rows,
and the logits against it are computed shard by shard (`moco_loss`).

With SSPS the positive branch is the keys: y^ comes from the query encoder
(inference mode, as sslsv), both keys of a covered anchor are replaced by
the pair stored in the positive queue before the loss, the positive queue
receives the original keys, and the negative queue the keys the loss used
(as sslsv enqueues its replaced keys).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax
from jax.sharding import PartitionSpec as P

from ssps_jax.methods.base import Fail, Target
from ssps_jax.methods.common import (
    SiameseMethod,
    ema,
    gathered,
    momentum_tau,
    normalise,
    output_dim,
    validate_momentum,
)
from ssps_jax.sharding import DATA


def moco_loss(
    query: jnp.ndarray, key: jnp.ndarray, queue: jnp.ndarray, temperature: float, axis_name: str | None = None
) -> jnp.ndarray:
    """InfoNCE of this device's queries: positive its key, negatives every row of the (sharded) queue.

    query, key (n, D) unit rows of this device's examples; queue (blocks, rows,
    D) this device's shard of the negative queue (its rows of every block), a
    constant. The queries of all devices are gathered and scored against the
    local shard; the log-sum-exp of each query's negatives is then combined
    over the shards (a gather of one number per query and shard), so each
    device computes its queries' loss against the whole queue while holding a
    1 / devices slice of it. Returns this device's mean (its pmean over
    devices is the loss of the global batch, as for nt_xent).
    """
    n = query.shape[0]
    negatives = lax.stop_gradient(queue).reshape(-1, queue.shape[-1]).astype(query.dtype)
    everyone, offset = gathered(query, axis_name)  # (N, D)
    shard_lse = jax.nn.logsumexp(everyone @ negatives.T / temperature, axis=1)  # (N,) over this shard
    if axis_name is not None:
        shard_lse = jax.nn.logsumexp(lax.all_gather(shard_lse, axis_name), axis=0)  # over all shards
    negative_lse = lax.dynamic_slice_in_dim(shard_lse, offset, n)
    positive = jnp.sum(query * key, axis=1) / temperature
    return jnp.mean(jnp.logaddexp(positive, negative_lse) - positive)


def initial_queue(seed: int, capacity: int, global_batch: int, dim: int) -> jnp.ndarray:
    """(2, capacity / G, G, D) random unit rows, as sslsv starts its queue."""
    rows = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), 0x30C0), (2, capacity, dim))
    return normalise(rows).reshape(2, capacity // global_batch, global_batch, dim)


@dataclasses.dataclass(frozen=True)
class MoCoSettings:
    temperature: float
    start_tau: float
    end_tau: float
    tau_scheduler: bool
    total_steps: int


class MoCoMethod(SiameseMethod):
    name = "moco"
    title = "MoCo"
    positive_what = "a key"
    summary = "MoCo: temperature, negative queue, momentum encoder (tau), optional projector"
    demo_config = "demo_moco_ssps.py"
    sslsv_momentum = ("momentum", {"encoder": "encoder_momentum", "projector": "projector_momentum"})
    sslsv_not_imported = ("queue", "queue_ptr", "queue_labels", "queue_labels_ptr")

    def default_config(self) -> dict:
        return {  # sslsv's MoCo defaults (the SSPS experiments: temperature 0.03, no projector)
            "temperature": 0.2,
            "queue_size": 65536,  # rounded down to a multiple of the global batch
            "start_tau": 0.999,
            "end_tau": 1.0,
            "tau_scheduler": False,  # True: tau from start_tau to end_tau by a half cosine over training
            "projector": True,
            "projector_hidden_dim": 2048,
            "projector_output_dim": 128,
        }

    def validate(self, config: ml_collections.ConfigDict, fail: Fail) -> None:
        m = config.moco
        if m.temperature <= 0:
            fail("moco.temperature", f"must be > 0, got {m.temperature}")
        if m.queue_size < config.train.global_batch_size:
            fail("moco.queue_size", f"{m.queue_size} is smaller than one global batch")
        validate_momentum("moco", m, fail)

    def settings(self, config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> MoCoSettings:
        m = config.moco
        return MoCoSettings(
            temperature=m.temperature,
            start_tau=m.start_tau,
            end_tau=m.end_tau,
            tau_scheduler=m.tau_scheduler,
            total_steps=total_steps,
        )

    def init_state(self, config: ml_collections.ConfigDict, variables: dict) -> dict:
        """The key network starts as a copy of the query network; the queue as random unit rows."""
        batch = config.train.global_batch_size
        capacity = config.moco.queue_size // batch * batch
        return {
            "momentum": variables,
            "queue": initial_queue(config.seed, capacity, batch, output_dim(config, config.moco)),
        }

    def state_specs(self, state: dict) -> dict:
        """The key network replicated; the queue split along its rows like the SSPS queues."""
        return {"momentum": jax.tree.map(lambda _: P(), state["momentum"]), "queue": P(None, None, DATA)}

    def positive_shape(self, config: ml_collections.ConfigDict) -> tuple[int, int]:
        """Both keys."""
        return 2, output_dim(config, config.moco)

    def target(self, state, batch, *, model, settings):
        """The key network's (training-mode) outputs of both views, unit rows: (2, n, D)."""
        momentum = state.method_state["momentum"]
        (k1, k2), updates = model.apply(momentum, batch["views"], train=True, mutable=["batch_stats"])
        return Target(lax.stop_gradient(jnp.stack([normalise(k1), normalise(k2)])), updates)

    def loss(self, outputs, positive, *, state, settings: MoCoSettings, **_):
        """Each view's queries against the other view's keys and that view's negative queue."""
        queue = state.method_state["queue"]
        q1, q2 = normalise(outputs[0]), normalise(outputs[1])
        loss_1 = moco_loss(q1, positive[1], queue[1], settings.temperature, DATA)
        loss_2 = moco_loss(q2, positive[0], queue[0], settings.temperature, DATA)
        return (loss_1 + loss_2) / 2, {}

    def update(self, state, params, outputs, positive, target, *, settings: MoCoSettings):
        """The key network's EMA step; the keys the loss used into the negative queue's block (step mod blocks)."""
        s = settings
        momentum, queue = state.method_state["momentum"], state.method_state["queue"]
        tau = momentum_tau(state.step, s.total_steps, s.start_tau, s.end_tau, s.tau_scheduler)
        block = state.step % queue.shape[1]
        method_state = {
            "momentum": {"params": ema(momentum["params"], params, tau), **target.updates},
            "queue": lax.dynamic_update_index_in_dim(queue, positive.astype(queue.dtype), block, axis=1),
        }
        return method_state, {"tau": jnp.asarray(tau, jnp.float32)}


METHOD = MoCoMethod()
