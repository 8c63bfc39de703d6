"""Optimizers and learning-rate schedules (sslsv's, in optax)."""

from __future__ import annotations

import ml_collections
import optax


def learning_rate_schedule(optim: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    lr = optim.learning_rate
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


def make_optimizer(
    optim: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its schedule (returned separately, for logging)."""
    schedule = learning_rate_schedule(optim, steps_per_epoch, total_steps)
    parts = []
    if optim.clip_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.clip_grad_norm))
    if optim.weight_decay > 0 and optim.optimizer != "adamw":
        # torch's Adam/SGD weight_decay: an L2 term added to the gradient.
        parts.append(optax.add_decayed_weights(optim.weight_decay))
    if optim.optimizer == "adam":
        parts.append(optax.adam(schedule))
    elif optim.optimizer == "adamw":
        parts.append(optax.adamw(schedule, weight_decay=optim.weight_decay))
    else:
        parts.append(optax.sgd(schedule, momentum=optim.momentum))
    return optax.chain(*parts), schedule
