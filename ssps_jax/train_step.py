"""The train step: one pure function per device, run with shard_map over the mesh.

`train_step(state, batch, rng) -> (state, metrics)` is written for one
device, in pmap's programming model: it sees its slice of the global batch,
BatchNorm and the loss talk to the other devices through collectives over the
`data` axis, and gradients are averaged with `pmean`. `make_train_step` wraps
it in `jax.shard_map` (parameters replicated, batch split) and `jax.jit`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ssps_jax.methods.simclr import nt_xent
from ssps_jax.sharding import DATA
from ssps_jax.train_state import TrainState


def train_step(
    state: TrainState,
    batch: dict,
    rng: jax.Array,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    temperature: float,
) -> tuple[TrainState, dict]:
    """One SimCLR step on this device's examples (call inside shard_map)."""
    # This device's randomness: the step key folded with the device index.
    device_rng = jax.random.fold_in(rng, lax.axis_index(DATA))

    def loss_fn(params):
        (z1, z2), updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["views"],
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": device_rng},  # for stochastic layers; the encoders here have none
        )
        return nt_xent(z1, z2, temperature, axis_name=DATA), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # The loss is a mean over devices of per-device means: so are the gradients.
    grads = lax.pmean(grads, DATA)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,  # already identical on every device (synchronised BN)
        opt_state=opt_state,
    )
    metrics = {"loss": lax.pmean(loss, DATA), "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, temperature: float):
    """The global step: jit(shard_map(train_step)); donates the input state."""
    step = functools.partial(train_step, model=model, tx=tx, temperature=temperature)
    # check_vma=False: the per-device (pmap) model, where a replicated input's
    # gradient is per device until pmean'd, as written above.
    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA), P()), out_specs=(P(), P()), check_vma=False)
    return jax.jit(sharded, donate_argnums=0)
