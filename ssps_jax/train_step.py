"""The train step: one method's step parts, in one order, run with shard_map over the mesh.

`step(state, batch, rng) -> (state, metrics)` is written for one device, in
pmap's programming model: it sees its slice of the global batch, BatchNorm
and the losses talk to the other devices through collectives over the
`data` axis, and gradients are averaged over it (each device holds, and
receives the mean gradient of, its part of the large parameters, and of a
method's momentum copy of them, which the step first gathers whole in the
model's compute dtype: update_sharding.py; the method's `update`, a
teacher's EMA, works on the parts).
`method_step` is that step for any method: the method supplies its parts
(methods/base.py: target, forward, loss, update, and which branch is the
positive one) and this module does the rest, the same way for all.
`make_train_step` wraps it in `jax.shard_map` (small parameters
replicated; large ones, batch and SSPS queues split) and `jax.jit`, after
turning the batch the input pipeline sent into the one the methods take
(`device_augment.model_batch`: with `data.augment.on = "device"`, the views
are augmented there, on each device's examples; float32 batches pass
unchanged).

SSPS enters here and nowhere else (docs/method.md §3-§5), in the epochs
where the queues are live: `reference_and_positives` computes y^ (the
L2-normalised encoder output of the clean reference crop in inference mode,
with the variables evaluation uses, outside the gradient) and draws this
step's pseudo-positives; they take the place of the positive branch of the
anchors the mask selects -- the target's outputs before the loss, or the
online forward's inside it -- and `ssps.enqueue` writes the batch's
(index, y^) and (index, original positive branch) into the queues.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ssps_jax import device_augment, update_sharding
from ssps_jax.sharding import DATA
from ssps_jax.ssps import step as ssps_step
from ssps_jax.ssps.lifecycle import SSPS
from ssps_jax.train_state import TrainState


def apply_gradients(params, opt_state, grads, tx: optax.GradientTransformation, axes=None, reduce_in_float32=False):
    """Averages per-device gradients over the mesh and takes one optimizer step: (params, opt_state, grad norm).

    `axes` (update_sharding.split_axes; None: no leaf split) says which parameters are split: of those,
    `params` and `opt_state` hold this device's part, and so do the averaged gradients and the result. The
    gradients are averaged in their own dtype (a kernel gathered in bf16 has a bf16 gradient) or, with
    `reduce_in_float32`, in the parameters' (config.optim.reduce_gradients_in_float32), and applied in the
    parameters'.
    """
    if axes is None:
        axes = jax.tree.map(lambda _: None, grads)

    def in_params_dtype(tree):
        return jax.tree.map(lambda g, p: g.astype(p.dtype), tree, params)

    if reduce_in_float32:
        grads = in_params_dtype(grads)
    # The loss is a mean over devices of per-device means: so are the gradients.
    grads = in_params_dtype(update_sharding.mean_gradients(grads, axes))
    # The clipping transforms (optim.py) take norms of whole tensors: they sum the parts' squares over the mesh.
    tx = optax.with_extra_args_support(tx)
    updates, opt_state = tx.update(grads, opt_state, params, split_axes=axes)
    return optax.apply_updates(params, updates), opt_state, update_sharding.global_norm(grads, axes)


def whole_networks(method, state: TrainState, axes, dtype) -> TrainState:
    """`state` with its split parameters, and those of the method's momentum copy of them (a teacher), whole:
    gathered from the devices' parts, the kernels in the compute dtype `dtype` (update_sharding.gather). What the
    method's target, forward and loss read."""
    state = state.replace(params=update_sharding.gather(state.params, axes, dtype))
    if (entry := method.momentum_entry) is None:
        return state
    copy = state.method_state[entry]
    whole = update_sharding.gather(copy["params"], update_sharding.sub_axes(axes, copy["params"]), dtype)
    return state.replace(method_state={**state.method_state, entry: {**copy, "params": whole}})


def reference_and_positives(model: nn.Module, variables, state: TrainState, batch: dict, rng, ssps: SSPS):
    """y^ (the reference crop through the encoder of `variables`, inference mode), then this
    step's pseudo-positives: (y^, positives (V, n, D), replace mask (n,), diagnostics)."""
    y_ref = ssps_step.normalise(model.apply(variables, batch["reference"], method=type(model).embed))
    positives, mask, metrics = ssps_step.pseudo_positives(
        state.ssps, state.step, batch["index"], y_ref, rng, ssps, DATA
    )
    return y_ref, positives, mask, metrics


def method_step(
    method,
    state: TrainState,
    batch: dict,
    rng,
    *,
    model: nn.Module,
    tx,
    settings,
    ssps: SSPS | None,
    update_axes=None,
    compute_dtype=None,
    reduce_in_float32=False,
):
    """One step of `method` (a methods.base.Method) on this device's examples (call inside shard_map).

    `rng` is the step key shared by all devices; `ssps` is None without SSPS; `update_axes` as apply_gradients:
    the state holds the split parameters' parts (and its momentum copy's), which the step gathers in
    `compute_dtype` (the model's; None: the parameters' own) for the networks to read, and averages their
    gradients in that dtype (`reduce_in_float32`: in the parameters' dtype, float32).
    """
    # This device's randomness (stochastic layers): the step key folded with the device index.
    device_rng = jax.random.fold_in(rng, lax.axis_index(DATA))
    held = state  # as the train state holds it: of a split parameter, this device's part
    if update_axes is not None:
        state = whole_networks(method, held, update_axes, compute_dtype)
    target = method.target(state, batch, model=model, settings=settings)
    metrics = {}
    if ssps is not None:
        y_ref, positives, mask, metrics = reference_and_positives(
            model, method.eval_variables(state), state, batch, rng, ssps
        )

    def used(branch):
        """The positive branch (V, n, D) as the loss uses it: pseudo-positives where the mask says so."""
        if ssps is None:
            return branch
        if branch is None:
            raise ValueError(f"{method.name} has no positive branch for SSPS to replace")
        return jnp.where(mask[None, :, None], positives.astype(branch.dtype), branch)

    target_used = None if target is None else used(target.positive)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        outputs, batch_stats = method.forward(variables, batch, device_rng, model=model, settings=settings)
        positive = target_used if target is not None else used(method.online_positive(outputs))
        loss, loss_metrics = method.loss(
            outputs,
            positive,
            variables=variables,
            state=state,
            batch=batch,
            target=target,
            model=model,
            settings=settings,
        )
        return loss, (batch_stats, outputs, positive, loss_metrics)

    (loss, (batch_stats, outputs, positive, loss_metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    params, opt_state, grad_norm = apply_gradients(
        held.params, held.opt_state, grads, tx, update_axes, reduce_in_float32
    )
    # The method's update (a teacher's EMA) works on the parts, of the new parameters and of the teacher's.
    method_state, update_metrics = method.update(held, params, outputs, positive, target, settings=settings)
    new_state = held.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,  # already identical on every device (synchronised BN)
        opt_state=opt_state,
        method_state=method_state,
    )
    if ssps is not None:
        original = target.positive if target is not None else method.online_positive(outputs)
        queues = ssps_step.enqueue(state.ssps, state.step, ssps.steps_per_epoch, batch["index"], y_ref, original)
        new_state = new_state.replace(ssps=queues)
    metrics.update(loss=lax.pmean(loss, DATA), grad_norm=grad_norm)
    metrics.update({name: lax.pmean(value, DATA) for name, value in loss_metrics.items()})
    metrics.update(update_metrics)
    return new_state, metrics


def make_train_step(
    method,
    model: nn.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    settings,
    state_specs: TrainState,
    ssps: SSPS | None = None,
    update_axes=None,
    compute_dtype=None,
    reduce_in_float32=False,
):
    """The global step of `method` (a methods.base.Method): jit(shard_map(step)); donates the input state.

    `update_axes`: the parameters split over the mesh (update_sharding.split_axes; None: none), as the layouts
    of the parameters and the optimizer state in `state_specs` say; the step gathers them in `compute_dtype`
    (the model's; None: the parameters' own dtype) and averages their gradients in it (`reduce_in_float32`: in
    the parameters' dtype; config.optim.reduce_gradients_in_float32).
    """

    def step(state, batch, rng):
        # With data.augment.on = "device" the views are augmented here, on this device's examples, before any
        # method sees them; a batch of float32 waveforms passes unchanged.
        batch = device_augment.model_batch(batch)
        return method_step(
            method,
            state,
            batch,
            rng,
            model=model,
            tx=tx,
            settings=settings,
            ssps=ssps,
            update_axes=update_axes,
            compute_dtype=compute_dtype,
            reduce_in_float32=reduce_in_float32,
        )

    step.__name__ = f"{method.name}_step"  # what XLA's compile logs and profiles call the program
    # check_vma=False: the per-device (pmap) model, where a replicated input's
    # gradient is per device until pmean'd, as written above.
    sharded = jax.shard_map(
        step, mesh=mesh, in_specs=(state_specs, P(DATA), P()), out_specs=(state_specs, P()), check_vma=False
    )
    return jax.jit(sharded, donate_argnums=0)
