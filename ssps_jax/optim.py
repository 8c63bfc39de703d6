"""Optimizers and learning-rate schedules (sslsv's, in optax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from ssps_jax import update_sharding

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("step", "cosine", "warmup_cosine", "constant")


def default_config() -> dict:
    """`config.optim`: sslsv's Adam, lr 1e-3 x 0.95 every 5 epochs, no weight decay."""
    return {
        "optimizer": "adam",
        "learning_rate": 1e-3,
        "schedule": "step",  # sslsv's default: x decay_rate every decay_every_epochs
        "decay_rate": 0.95,
        "decay_every_epochs": 5,
        "min_learning_rate": 1e-5,  # cosine schedules
        # From this epoch on, the schedule as if it had started from learning_rate x lr_scale (0: never):
        # e.g. a gentler rate once SSPS starts (docs/demo_findings.md). The fair baseline needs the same.
        "lr_scale_from_epoch": 0,
        "lr_scale": 1.0,
        "warmup_epochs": 10,  # warmup_cosine
        "weight_decay": 0.0,  # L2 added to the gradient, like torch's Adam/SGD weight_decay
        "momentum": 0.9,  # sgd
        "clip_grad_norm": 0.0,  # 0: off
        "clip_grad_per_param": 0.0,  # DINO: each tensor's gradient norm <= this; 0: off
        "decay_biases_and_norms": True,  # False: weight decay on weights (ndim > 1) only
        # Each device holds and updates 1/n of every parameter of at least split_update_min_size elements and
        # of its optimizer state, and steps gather them in the compute dtype (ssps_jax/update_sharding.py).
        # False: every device holds and updates everything; the same numbers up to the order of the
        # gradients' sums.
        "split_update": True,
        "split_update_min_size": 1 << 16,
        # A gradient is averaged over the devices in the dtype the step computed it in: a split kernel's, gathered
        # in the compute dtype, in bf16 in a bf16 step (half the bytes of float32, summed in bf16); the others in
        # float32. True: every gradient in float32, as a float32 step does (docs/performance.md, "Numerics").
        "reduce_gradients_in_float32": False,
    }


def validate(o: ml_collections.ConfigDict, fail) -> None:
    """Checks `config.optim`; `fail(key, message)` raises."""
    for key, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
        if o[key] not in choices:
            fail(f"optim.{key}", f"must be one of {choices}, got {o[key]!r}")
    if o.learning_rate <= 0:
        fail("optim.learning_rate", f"must be > 0, got {o.learning_rate}")
    if not o.lr_scale > 0:  # also NaN
        fail("optim.lr_scale", f"must be > 0, got {o.lr_scale}")
    for key in (
        "weight_decay",
        "clip_grad_norm",
        "clip_grad_per_param",
        "split_update_min_size",
        "min_learning_rate",
        "warmup_epochs",
        "lr_scale_from_epoch",
    ):
        if o[key] < 0:
            fail(f"optim.{key}", f"must be >= 0, got {o[key]}")


def split_min_size(optim: ml_collections.ConfigDict) -> int | None:
    """The size from which a parameter's update is split over the devices (update_sharding.py); None: no
    update is split."""
    return optim.split_update_min_size if optim.split_update else None


def learning_rate_schedule(optim: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    schedule = _schedule(optim, optim.learning_rate, steps_per_epoch, total_steps)
    if not optim.lr_scale_from_epoch or optim.lr_scale == 1:
        return schedule
    # The same schedule from a scaled peak, at the same absolute steps (so a step schedule keeps its decay
    # count): a continuation at learning_rate x lr_scale computes exactly these rates.
    scaled = _schedule(optim, optim.learning_rate * optim.lr_scale, steps_per_epoch, total_steps)
    boundary = optim.lr_scale_from_epoch * steps_per_epoch
    return lambda step: jnp.where(step < boundary, schedule(step), scaled(step))


def _schedule(optim: ml_collections.ConfigDict, lr: float, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    if optim.schedule == "step":  # sslsv's default: lr x decay_rate every decay_every_epochs
        return optax.exponential_decay(
            lr, transition_steps=optim.decay_every_epochs * steps_per_epoch, decay_rate=optim.decay_rate, staircase=True
        )
    if optim.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, decay_steps=total_steps, alpha=optim.min_learning_rate / lr)
    if optim.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0,
            lr,
            warmup_steps=round(optim.warmup_epochs * steps_per_epoch),
            decay_steps=total_steps,
            end_value=optim.min_learning_rate,
        )
    return optax.constant_schedule(lr)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """optax.clip_by_global_norm, also when each device holds only parts of some gradients.

    `split_axes` (the extra argument the train step passes; update_sharding.py) says which leaves are parts:
    their squares are summed over the devices, so every device scales by the norm of the whole gradients.
    """

    def clip(updates, state, params=None, *, split_axes=None, **_):
        del params
        norm = update_sharding.global_norm(updates, split_axes)
        scale = lambda g: jnp.where(norm < max_norm, g, g / norm.astype(g.dtype) * max_norm)  # noqa: E731
        return jax.tree.map(scale, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), clip)


def clip_each_by_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """Scales each parameter's gradient to norm <= max_norm, separately (sslsv's DINO clipping).

    optax's clip_by_global_norm clips the norm of all gradients together; DINO
    clips every tensor on its own: g * min(1, max_norm / (||g|| + 1e-6)), with
    ||g|| the norm of the whole tensor where this device holds a part of it
    (`split_axes`, as clip_by_global_norm).
    """

    def clip(updates, state, params=None, *, split_axes=None, **_):
        del params
        norms = update_sharding.leaf_norms(updates, split_axes)
        scale = lambda g, norm: g * jnp.minimum(1.0, max_norm / (norm + 1e-6))  # noqa: E731
        return jax.tree.map(scale, updates, norms), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), clip)


def _matrices(params):
    """True for weights, False for 1-D parameters (biases, norm scales): what weight decay applies to."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def _labels_under(params, module: str, inside: str, outside: str):
    """A tree like `params` labelling each leaf `inside` if its path passes through `module`, else `outside`."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: inside if module in path else outside for path in flat})


def make_optimizer(
    optim: ml_collections.ConfigDict,
    steps_per_epoch: int,
    total_steps: int,
    frozen_module: str | None = None,
    frozen_epochs: int = 0,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its schedule (returned separately, for logging).

    The parameters of every module named `frozen_module` are left untouched
    (no update, no weight decay, no momentum) during the first
    `frozen_epochs` epochs (DINO's `last_layer`, SwAV's `prototypes`).
    """
    schedule = learning_rate_schedule(optim, steps_per_epoch, total_steps)
    parts = []
    if optim.clip_grad_norm > 0:
        parts.append(clip_by_global_norm(optim.clip_grad_norm))
    if optim.clip_grad_per_param > 0:
        parts.append(clip_each_by_norm(optim.clip_grad_per_param))
    mask = None if optim.decay_biases_and_norms else _matrices
    decay = [optax.add_decayed_weights(optim.weight_decay, mask)] if optim.weight_decay > 0 else []
    if optim.optimizer == "adam":  # torch's Adam weight_decay: an L2 term added to the gradient
        direction = optax.chain(*decay, optax.scale_by_adam())
    elif optim.optimizer == "adamw":  # decoupled: decay added after Adam's scaling
        direction = optax.chain(optax.scale_by_adam(), *decay)
    else:  # torch's SGD: d = g + wd p; buf = momentum buf + d
        direction = optax.chain(*decay, optax.trace(decay=optim.momentum))
    if frozen_module is not None and frozen_epochs > 0:
        frozen_steps = frozen_epochs * steps_per_epoch
        direction = optax.multi_transform(
            {
                "frozen": optax.transforms.conditionally_mask(direction, lambda count: count >= frozen_steps),
                "free": direction,
            },
            lambda params: _labels_under(params, frozen_module, "frozen", "free"),
        )
    parts += [direction, optax.scale_by_learning_rate(schedule)]
    return optax.chain(*parts), schedule
