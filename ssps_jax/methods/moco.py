"""MoCo v2+ (Chen et al., 2020) for speaker embeddings, as sslsv trains it (docs/method.md §6.5).

The query network is SimCLR's model (encoder + optional projector, each view
in its own call); the key network has the same module tree and its own
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

from ssps_jax.methods.base import Fail, Method, check_kmeans_positive, output_dim, views_input
from ssps_jax.methods.dino import ema, teacher_momentum
from ssps_jax.methods.simclr import SimCLR, siamese_model
from ssps_jax.sharding import DATA
from ssps_jax.ssps import step as ssps_step
from ssps_jax.train_step import apply_gradients, reference_and_positives


def _normalise(x: jnp.ndarray) -> jnp.ndarray:
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


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
    if axis_name is None:
        everyone, offset = query, 0
    else:
        everyone = lax.all_gather(query, axis_name, tiled=True)  # (N, D), device blocks in order
        offset = lax.axis_index(axis_name) * n
    shard_lse = jax.nn.logsumexp(everyone @ negatives.T / temperature, axis=1)  # (N,) over this shard
    if axis_name is not None:
        shard_lse = jax.nn.logsumexp(lax.all_gather(shard_lse, axis_name), axis=0)  # over all shards
    negative_lse = lax.dynamic_slice_in_dim(shard_lse, offset, n)
    positive = jnp.sum(query * key, axis=1) / temperature
    return jnp.mean(jnp.logaddexp(positive, negative_lse) - positive)


def initial_queue(seed: int, capacity: int, global_batch: int, dim: int) -> jnp.ndarray:
    """(2, capacity / G, G, D) random unit rows, as sslsv starts its queue."""
    rows = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), 0x30C0), (2, capacity, dim))
    return _normalise(rows).reshape(2, capacity // global_batch, global_batch, dim)


@dataclasses.dataclass(frozen=True)
class MoCoSettings:
    temperature: float
    start_tau: float
    end_tau: float
    tau_scheduler: bool
    total_steps: int


class MoCoMethod(Method):
    name = "moco"
    summary = "MoCo: temperature, negative queue, momentum encoder (tau), optional projector"
    crop_mode = "siamese"

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
        for key in ("start_tau", "end_tau"):
            if not 0 <= m[key] <= 1:
                fail(f"moco.{key}", f"must be in [0, 1], got {m[key]}")
        if m.start_tau > m.end_tau:
            fail("moco.start_tau", f"{m.start_tau} is above end_tau {m.end_tau}")
        check_kmeans_positive(config, fail, "moco", "a key")

    def build_model(self, config: ml_collections.ConfigDict, bn_axis_name: str | None = None) -> SimCLR:
        return siamese_model(config, config.moco, bn_axis_name)

    def example_input(self, config: ml_collections.ConfigDict) -> jax.ShapeDtypeStruct:
        return views_input(config.data.crops.frame_seconds)

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

    def step(self, state, batch, rng, *, model, tx, settings: MoCoSettings, ssps=None):
        """One MoCo (or MoCo-SSPS) step on this device's examples (call inside shard_map)."""
        s = settings
        momentum, queue = state.method_state["momentum"], state.method_state["queue"]
        (k1, k2), momentum_updates = model.apply(momentum, batch["views"], train=True, mutable=["batch_stats"])
        keys = lax.stop_gradient(jnp.stack([_normalise(k1), _normalise(k2)]))  # (2, n, D)
        used = keys
        metrics = {}
        if ssps is not None:
            encoder = {"params": state.params, "batch_stats": state.batch_stats}
            y_ref, positives, mask, metrics = reference_and_positives(model, encoder, state, batch, rng, ssps)
            used = jnp.where(mask[None, :, None], positives.astype(keys.dtype), keys)

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            (q1, q2), updates = model.apply(variables, batch["views"], train=True, mutable=["batch_stats"])
            q1, q2 = _normalise(q1), _normalise(q2)
            loss_1 = moco_loss(q1, used[1], queue[1], s.temperature, DATA)
            loss_2 = moco_loss(q2, used[0], queue[0], s.temperature, DATA)
            return (loss_1 + loss_2) / 2, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        params, opt_state, grad_norm = apply_gradients(state, grads, tx)
        # Constant tau stays a Python float: 1 - tau is then exact in the parameters' dtype.
        tau = teacher_momentum(state.step, s.total_steps, s.start_tau, s.end_tau) if s.tau_scheduler else s.start_tau
        block = state.step % queue.shape[1]
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            method_state={
                "momentum": {"params": ema(momentum["params"], params, tau), **momentum_updates},
                "queue": lax.dynamic_update_index_in_dim(queue, used.astype(queue.dtype), block, axis=1),
            },
        )
        if ssps is not None:
            queues = ssps_step.enqueue(state.ssps, state.step, ssps.steps_per_epoch, batch["index"], y_ref, keys)
            new_state = new_state.replace(ssps=queues)
        metrics.update(loss=lax.pmean(loss, DATA), grad_norm=grad_norm, tau=jnp.asarray(tau, jnp.float32))
        return new_state, metrics


METHOD = MoCoMethod()
