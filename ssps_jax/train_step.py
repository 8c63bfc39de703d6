"""The train step: a method's pure per-device step, run with shard_map over the mesh.

`step(state, batch, rng) -> (state, metrics)` is written for one device, in
pmap's programming model: it sees its slice of the global batch, BatchNorm
and the losses talk to the other devices through collectives over the
`data` axis, and gradients are averaged with `pmean`. Each method writes its
step (`Method.step`, methods/*.py) from the pieces here; `make_train_step`
wraps any of them in `jax.shard_map` (parameters replicated, batch and SSPS
queues split) and `jax.jit`, after turning the batch the input pipeline sent
into the one the methods take (`device_augment.model_batch`: with
`data.augment.on = "device"`, the views are augmented there, on each
device's examples; float32 batches pass unchanged).

SSPS enters every method's step the same way (docs/method.md §3-§5), in the
epochs where the queues are live: `reference_and_positives` computes y^ (the
L2-normalised encoder output of the clean reference crop in inference mode,
outside the gradient) and draws this step's pseudo-positives; the method
puts them in place of its positive-branch embeddings where the mask says so,
and `ssps.enqueue` writes the batch's (index, y^) and (index, positives) into
the queues.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ssps_jax import device_augment
from ssps_jax.sharding import DATA
from ssps_jax.ssps import step as ssps_step
from ssps_jax.ssps.lifecycle import SSPS
from ssps_jax.train_state import TrainState


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation):
    """Averages per-device gradients over the mesh and takes one optimizer step: (params, opt_state, grad norm)."""
    # The loss is a mean over devices of per-device means: so are the gradients.
    grads = lax.pmean(grads, DATA)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state, optax.tree.norm(grads)


def reference_and_positives(model: nn.Module, variables, state: TrainState, batch: dict, rng, ssps: SSPS):
    """y^ (the reference crop through the encoder of `variables`, inference mode), then this
    step's pseudo-positives: (y^, positives (V, n, D), replace mask (n,), diagnostics)."""
    y_ref = ssps_step.normalise(model.apply(variables, batch["reference"], method=type(model).embed))
    positives, mask, metrics = ssps_step.pseudo_positives(
        state.ssps, state.step, batch["index"], y_ref, rng, ssps, DATA
    )
    return y_ref, positives, mask, metrics


def make_train_step(
    method,
    model: nn.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    settings,
    state_specs: TrainState,
    ssps: SSPS | None = None,
):
    """The global step of `method` (a methods.base.Method): jit(shard_map(step)); donates the input state."""

    def step(state, batch, rng):
        # With data.augment.on = "device" the views are augmented here, on this device's examples, before any
        # method sees them; a batch of float32 waveforms passes unchanged.
        batch = device_augment.model_batch(batch)
        return method.step(state, batch, rng, model=model, tx=tx, settings=settings, ssps=ssps)

    step.__name__ = f"{method.name}_step"  # what XLA's compile logs and profiles call the program
    # check_vma=False: the per-device (pmap) model, where a replicated input's
    # gradient is per device until pmean'd, as written above.
    sharded = jax.shard_map(
        step, mesh=mesh, in_specs=(state_specs, P(DATA), P()), out_specs=(state_specs, P()), check_vma=False
    )
    return jax.jit(sharded, donate_argnums=0)
