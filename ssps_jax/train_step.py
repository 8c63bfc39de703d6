"""The train steps: one pure function per device and method, run with shard_map over the mesh.

`step(state, batch, rng) -> (state, metrics)` is written for one device, in
pmap's programming model: it sees its slice of the global batch, BatchNorm
and the losses talk to the other devices through collectives over the
`data` axis, and gradients are averaged with `pmean`. `make_train_step`
wraps it in `jax.shard_map` (parameters replicated, batch and SSPS queues
split) and `jax.jit`.

SimCLR with SSPS (SPEC sections 3, 5, 6), in the epochs where the queues are live:
  1. y^ = L2-normalised encoder output of the clean reference crop, in
     inference mode (BatchNorm running statistics), outside the gradient;
  2. pseudo-positives are drawn from the queues (ssps/step.py); from
     start_epoch on (and once the epoch's clustering is done) they replace the
     view-2 embeddings of the anchors that got one, as constants;
  3. the loss is NT-Xent of view 1 against the (replaced) view 2;
  4. the batch's (index, y^) and (index, view-2 embedding) go into the queues.

DINO (methods/dino.py): the teacher (training-mode BatchNorm, as sslsv's
momentum encoder) embeds the global views; with SSPS, y^ comes from the
teacher encoder in inference mode, both teacher outputs are replaced before
the loss and both original ones are queued. The student is updated by SGD
(gradients clipped per tensor, last layer frozen in epoch 0: optimizer),
then the teacher by EMA with tau on a cosine from start_tau to end_tau, and
the centre from the teacher outputs the loss used.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ssps_jax.methods import dino
from ssps_jax.methods.simclr import nt_xent
from ssps_jax.sharding import DATA
from ssps_jax.ssps import step as ssps_step
from ssps_jax.ssps.step import SSPSStep
from ssps_jax.train_state import TrainState


@dataclasses.dataclass(frozen=True)
class SimCLRSettings:
    temperature: float


@dataclasses.dataclass(frozen=True)
class DINOSettings:
    student_temperature: float
    teacher_temperature: float
    teacher_temperature_warmup: float
    teacher_temperature_warmup_epochs: int
    center_momentum: float
    start_tau: float
    end_tau: float
    steps_per_epoch: int
    total_steps: int


def _apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation):
    """Averages per-device gradients over the mesh and takes one optimizer step."""
    # The loss is a mean over devices of per-device means: so are the gradients.
    grads = lax.pmean(grads, DATA)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state, optax.tree.norm(grads)


def _reference_and_positives(model: nn.Module, variables, state: TrainState, batch: dict, rng, ssps: SSPSStep):
    """y^ (the reference crop through the encoder of `variables`, inference mode), then this
    step's pseudo-positives: (y^, positives, mask, metrics) of ssps_step.pseudo_positives."""
    y_ref = ssps_step.normalise(model.apply(variables, batch["reference"], method=type(model).embed))
    positives, mask, metrics = ssps_step.pseudo_positives(
        state.ssps, state.step, batch["index"], y_ref, rng, ssps, DATA
    )
    return y_ref, positives, mask, metrics


def simclr_step(
    state: TrainState,
    batch: dict,
    rng: jax.Array,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    settings: SimCLRSettings,
    ssps: SSPSStep | None = None,
) -> tuple[TrainState, dict]:
    """One SimCLR (or SimCLR-SSPS) step on this device's examples (call inside shard_map)."""
    # This device's randomness: the step key folded with the device index.
    device_rng = jax.random.fold_in(rng, lax.axis_index(DATA))
    metrics = {}
    if ssps is not None:
        encoder = {"params": state.params, "batch_stats": state.batch_stats}
        y_ref, positives, mask, metrics = _reference_and_positives(model, encoder, state, batch, rng, ssps)

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
    params, opt_state, grad_norm = _apply_gradients(state, grads, tx)
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


def dino_step(
    state: TrainState,
    batch: dict,
    rng: jax.Array,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    settings: DINOSettings,
    ssps: SSPSStep | None = None,
) -> tuple[TrainState, dict]:
    """One DINO (or DINO-SSPS) step on this device's examples (call inside shard_map)."""
    s = settings
    epoch = state.step // s.steps_per_epoch
    teacher_out, teacher_updates = model.apply(
        state.teacher, batch["global_views"], train=True, mutable=["batch_stats"]
    )
    teacher_out = lax.stop_gradient(teacher_out)  # (G, n, K)
    used = teacher_out
    metrics = {}
    if ssps is not None:
        y_ref, positives, mask, metrics = _reference_and_positives(model, state.teacher, state, batch, rng, ssps)
        used = jnp.where(mask[None, :, None], positives.astype(teacher_out.dtype), teacher_out)
    temperature = dino.teacher_temperature(
        epoch, s.teacher_temperature, s.teacher_temperature_warmup, s.teacher_temperature_warmup_epochs
    )

    def loss_fn(params):
        student_out, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["global_views"],
            batch["local_views"],
            method=type(model).student,
            mutable=["batch_stats"],
        )
        loss = dino.dino_loss(student_out, used, state.center, s.student_temperature, temperature)
        return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, opt_state, grad_norm = _apply_gradients(state, grads, tx)
    tau = dino.teacher_momentum(state.step, s.total_steps, s.start_tau, s.end_tau)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        teacher={"params": dino.ema(state.teacher["params"], params, tau), **teacher_updates},
        center=dino.update_center(state.center, used, s.center_momentum, DATA),
    )
    if ssps is not None:
        queues = ssps_step.enqueue(state.ssps, state.step, ssps.steps_per_epoch, batch["index"], y_ref, teacher_out)
        new_state = new_state.replace(ssps=queues)
    metrics.update(loss=lax.pmean(loss, DATA), grad_norm=grad_norm, tau=tau, teacher_temperature=temperature)
    return new_state, metrics


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    settings: SimCLRSettings | DINOSettings,
    state_specs: TrainState,
    ssps: SSPSStep | None = None,
):
    """The global step of the method `settings` is for: jit(shard_map(step)); donates the input state."""
    fn = dino_step if isinstance(settings, DINOSettings) else simclr_step
    step = functools.partial(fn, model=model, tx=tx, settings=settings, ssps=ssps)
    # check_vma=False: the per-device (pmap) model, where a replicated input's
    # gradient is per device until pmean'd, as written above.
    sharded = jax.shard_map(
        step, mesh=mesh, in_specs=(state_specs, P(DATA), P()), out_specs=(state_specs, P()), check_vma=False
    )
    return jax.jit(sharded, donate_argnums=0)
