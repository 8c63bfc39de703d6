"""What a self-supervised framework is to the rest of the system.

A method is one module (methods/simclr.py, methods/dino.py, ...) exposing one
`Method` object, registered by name in methods/__init__.py. Everything the
build, the train step, SSPS, evaluation and the config validator need to know
about a framework is asked of that object; nothing else branches on
`config.method`.

The per-device step is the method's own (`Method.step`): it is called inside
`jax.shard_map` with this device's slice of the global batch, reaches the other
devices only through collectives over the `data` axis, and uses the shared
pieces of ssps_jax/train_step.py (gradient averaging, y^ and pseudo-positives)
so that every method is sharded, and gets SSPS, the same way.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ssps_jax.optim import make_optimizer

# Raised with (key, message) by Method.validate: the config validator turns it into a ConfigError naming the key.
Fail = Callable[[str, str], None]


def check_kmeans_positive(config: ml_collections.ConfigDict, fail: Fail, section: str, what: str) -> None:
    """Refuses SSPS 'kmeans' when its centroid (an encoder output) cannot stand where `what` (a projection) goes.

    For methods whose `<section>` has an optional projector: with one, its output size must be the encoder's.
    """
    s = config[section]
    if (
        config.ssps.enabled
        and config.ssps.sampling == "kmeans"
        and s.projector
        and s.projector_output_dim != config.model.encoder_dim
    ):
        fail(
            "ssps.sampling",
            f"'kmeans' puts a centroid of encoder outputs in place of {what}: "
            f"needs {section}.projector_output_dim == model.encoder_dim",
        )


class Method(abc.ABC):
    """A self-supervised framework: its model, optimizer, state, step and what SSPS queues for it."""

    name: str  # config.method, and the name of its config section
    summary: str  # its config section in one line (`ssps-jax train --help`)
    crop_mode: str  # which views data_pipelines.crops makes for it: "siamese" (2 crops) or "dino" (multi-crop)
    # Trained on speaker labels (the supervised baseline): `build` refuses a train split without them and
    # adds `label_state(config, speaker id of every dataset index)` to the method's state.
    needs_labels: bool = False

    @abc.abstractmethod
    def default_config(self) -> dict:
        """Its config section (`config.<name>`), with sslsv's defaults."""

    def preset(self, config: ml_collections.ConfigDict) -> None:
        """Sets what the framework needs outside its own section (crops, optimizer), as sslsv trains it."""
        config.data.crops.mode = self.crop_mode

    @abc.abstractmethod
    def validate(self, config: ml_collections.ConfigDict, fail: Fail) -> None:
        """Checks its own section, and what it cannot do with the rest of the config."""

    @abc.abstractmethod
    def build_model(self, config: ml_collections.ConfigDict, bn_axis_name: str | None = None) -> nn.Module:
        """The trainable model; it has `embed(wave, lengths)` for evaluation and y^."""

    def build_optimizer(
        self, config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
        return make_optimizer(config.optim, steps_per_epoch, total_steps)

    @abc.abstractmethod
    def example_input(self, config: ml_collections.ConfigDict) -> jax.ShapeDtypeStruct:
        """The shape the model is initialised with."""

    @abc.abstractmethod
    def settings(self, config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> Any:
        """The static (hashable) settings of its step."""

    def init_state(self, config: ml_collections.ConfigDict, variables: dict) -> dict | None:
        """Its training state beyond parameters, BatchNorm statistics and optimizer (a dict), or None.

        `variables` are the freshly initialised {"params", "batch_stats"}. The
        entries are checkpointed as top-level fields of the train state, so their
        names must not be TrainState's own.
        """
        del config, variables
        return None

    def label_state(self, config: ml_collections.ConfigDict, speaker: np.ndarray) -> dict:
        """State entries made from the speaker id (0, 1, ...) of every train index (methods with `needs_labels`).

        Raises ConfigError when the labels do not fit the config (more speakers than classes).
        """
        raise NotImplementedError(f"{self.name} does not train on labels")

    def state_specs(self, state: dict) -> dict:
        """Partition specs of `init_state`'s entries: replicated unless a method says otherwise."""
        return jax.tree.map(lambda _: jax.sharding.PartitionSpec(), state)

    @abc.abstractmethod
    def positive_shape(self, config: ml_collections.ConfigDict) -> tuple[int, int]:
        """(views, dimension) of the positive-branch embeddings SSPS queues and replaces."""

    def eval_variables(self, state) -> dict:
        """The variables evaluation and y^ embed with."""
        return {"params": state.params, "batch_stats": state.batch_stats}

    @abc.abstractmethod
    def step(self, state, batch: dict, rng: jax.Array, *, model: nn.Module, tx, settings, ssps) -> tuple[Any, dict]:
        """One step on this device's examples (inside shard_map); `ssps` is None without SSPS."""


def projector_dims(section: ml_collections.ConfigDict) -> tuple[int, int] | None:
    """(hidden, output) of a method section's optional projector (`projector`, `projector_*_dim` keys)."""
    return (section.projector_hidden_dim, section.projector_output_dim) if section.projector else None


def output_dim(config: ml_collections.ConfigDict, section: ml_collections.ConfigDict) -> int:
    """The dimension of what a method with an optional projector compares: the projector's, else the encoder's."""
    return section.projector_output_dim if section.projector else config.model.encoder_dim


def crop_samples(seconds: float) -> int:
    return round(seconds * 16000)


def views_input(seconds: float) -> jax.ShapeDtypeStruct:
    """(batch, views, samples) of one crop length: what the models are initialised with."""
    return jax.ShapeDtypeStruct((2, 2, crop_samples(seconds)), jnp.float32)
