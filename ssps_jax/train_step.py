"""The train step: one pure function per device, run with shard_map over the mesh.

`train_step(state, batch, rng) -> (state, metrics)` is written for one
device, in pmap's programming model: it sees its slice of the global batch,
BatchNorm and the loss talk to the other devices through collectives over the
`data` axis, and gradients are averaged with `pmean`. `make_train_step` wraps
it in `jax.shard_map` (parameters replicated, batch and SSPS queues split)
and `jax.jit`.

With SSPS (SPEC sections 3 and 5), in the epochs where the queues are live:
  1. y^ = L2-normalised encoder output of the clean reference crop, in
     inference mode (BatchNorm running statistics), outside the gradient;
  2. pseudo-positives are drawn from the queues (ssps/step.py); from
     start_epoch on (and once the epoch's clustering is done) they replace the
     view-2 embeddings of the anchors that got one, as constants;
  3. the loss is NT-Xent of view 1 against the (replaced) view 2;
  4. the batch's (index, y^) and (index, view-2 embedding) go into the queues.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ssps_jax.methods.simclr import nt_xent
from ssps_jax.sharding import DATA
from ssps_jax.ssps import step as ssps_step
from ssps_jax.ssps.step import SSPSStep
from ssps_jax.train_state import TrainState


def train_step(
    state: TrainState,
    batch: dict,
    rng: jax.Array,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    temperature: float,
    ssps: SSPSStep | None = None,
) -> tuple[TrainState, dict]:
    """One SimCLR (or SimCLR-SSPS) step on this device's examples (call inside shard_map)."""
    # This device's randomness: the step key folded with the device index.
    device_rng = jax.random.fold_in(rng, lax.axis_index(DATA))
    metrics = {}
    if ssps is not None:
        y_ref = ssps_step.normalise(
            model.apply(
                {"params": state.params, "batch_stats": state.batch_stats},
                batch["reference"],
                method=type(model).embed,
            )
        )
        positives, mask, metrics = ssps_step.pseudo_positives(
            state.ssps, state.step, batch["index"], y_ref, rng, ssps, DATA
        )

    def loss_fn(params):
        (z1, z2), updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["views"],
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": device_rng},  # for stochastic layers; the encoders here have none
        )
        z2_used = z2 if ssps is None else jnp.where(mask[:, None], positives[0].astype(z2.dtype), z2)
        return nt_xent(z1, z2_used, temperature, axis_name=DATA), (updates["batch_stats"], z2)

    (loss, (batch_stats, z2)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # The loss is a mean over devices of per-device means: so are the gradients.
    grads = lax.pmean(grads, DATA)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,  # already identical on every device (synchronised BN)
        opt_state=opt_state,
    )
    if ssps is not None:
        queues = ssps_step.enqueue(state.ssps, state.step, ssps.steps_per_epoch, batch["index"], y_ref, z2[None])
        new_state = new_state.replace(ssps=queues)
    metrics.update(loss=lax.pmean(loss, DATA), grad_norm=optax.tree.norm(grads))
    return new_state, metrics


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    temperature: float,
    state_specs: TrainState,
    ssps: SSPSStep | None = None,
):
    """The global step: jit(shard_map(train_step)); donates the input state."""
    step = functools.partial(train_step, model=model, tx=tx, temperature=temperature, ssps=ssps)
    # check_vma=False: the per-device (pmap) model, where a replicated input's
    # gradient is per device until pmean'd, as written above.
    sharded = jax.shard_map(
        step, mesh=mesh, in_specs=(state_specs, P(DATA), P()), out_specs=(state_specs, P()), check_vma=False
    )
    return jax.jit(sharded, donate_argnums=0)
