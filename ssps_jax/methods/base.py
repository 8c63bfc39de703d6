"""What a self-supervised framework is to the rest of the system.

A method is one module (methods/simclr.py, methods/dino.py, ...) exposing one
`Method` object, registered by name in methods/__init__.py. Everything the
build, the train step, SSPS, evaluation, the config validator, the CLI, the
demos, the benchmarks and the sslsv checkpoint converter need to know about
a framework is asked of that object; nothing else branches on its name.

A method does not write its train step. It supplies the parts of one
(`target`, `forward`, `online_positive`, `loss`, `update`), and
ssps_jax/train_step.py runs them in one order for every method, per device
inside `jax.shard_map`:

  target    outputs of a network the gradient does not train (a teacher, a
            momentum encoder), in training mode, or None;
  y^, pseudo-positives    with SSPS (train_step.reference_and_positives);
  forward   the trained networks on the batch, under the gradient;
  loss      from the forward's outputs and the positive branch as used:
            SSPS has replaced the pseudo-positives' anchors in it;
  gradient  averaged over the mesh, one optimizer step;
  update    the method's own state (EMA teacher, queues, centre);
  enqueue   with SSPS, y^ and the original positive branch into the queues.

The positive branch -- what SSPS replaces and the positive queue holds -- is
the target's `Target.positive` when `target` returns one (DINO's teacher
outputs, MoCo's keys), else `online_positive(outputs)` (SimCLR's z2). So a
method never mentions the SSPS queues, and every method gets SSPS the same way.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ssps_jax.optim import make_optimizer

# Raised with (key, message) by Method.validate: the config validator turns it into a ConfigError naming the key.
Fail = Callable[[str, str], None]


class Target(NamedTuple):
    """What a method computes outside the gradient before its loss (`Method.target`)."""

    positive: jax.Array  # (V, n, D) constants: the positive branch SSPS replaces and the positive queue holds
    updates: Any = None  # the target network's new BatchNorm statistics ({"batch_stats": ...}), for `update`
    extra: Any = None  # what else the loss and `update` need of this step (DINO: the teacher temperature)


class Method(abc.ABC):
    """A self-supervised framework: its config, model, optimizer, state, the parts of its step, and its names."""

    name: str  # config.method, and the name of its config section
    title: str  # how tables and logs write it ("SimCLR")
    summary: str  # its config section in one line (`ssps-jax train --help`)
    crop_mode: str  # which views data_pipelines.crops makes for it: "siamese" (2 crops) or "dino" (multi-crop)
    # Trained on speaker labels (the supervised baseline): `build` refuses a train split without them and
    # adds `label_state(config, speaker id of every dataset index)` to the method's state.
    needs_labels: bool = False
    # Its demo config under configs/ (`ssps-jax demo-methods`): with SSPS enabled, so that the demo trains it
    # with and without; None: no demo.
    demo_config: str | None = None
    # sslsv's names for what it holds beside the model (ssps_jax/sslsv_checkpoint.py):
    # the method-state entry that is a momentum copy of the model, and the sslsv names of its top-level modules;
    sslsv_momentum: tuple[str, dict[str, str]] | None = None
    # method-state arrays sslsv holds as a buffer of another shape (entry -> sslsv key);
    sslsv_buffers: dict[str, str] = {}
    # sslsv buffers an import leaves out (started fresh: their layout and write position are sslsv's own);
    sslsv_not_imported: tuple[str, ...] = ()
    # the config fields that size each top-level module (sslsv's names, which are ours; also a method state
    # entry by its name): for the error of a checkpoint or an sslsv file of other sizes.
    sslsv_sizes: dict[str, str] = {}

    @property
    def momentum_entry(self) -> str | None:
        """The method-state entry that is a momentum copy of the model (DINO's teacher; sslsv_momentum's), or None.

        It is {"params": some of the parameters' top-level modules, "batch_stats": ...}; the train state holds its
        parameters split as it holds the model's (update_sharding.py): `target` and `eval_variables` see them
        whole, in the compute dtype, and `update` sees this device's parts.
        """
        return None if self.sslsv_momentum is None else self.sslsv_momentum[0]

    # -- config ------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def default_config(self) -> dict:
        """Its config section (`config.<name>`), with sslsv's defaults."""

    def preset(self, config: ml_collections.ConfigDict) -> None:
        """Sets what the framework needs outside its own section (crops, optimizer), as sslsv trains it."""
        config.data.crops.mode = self.crop_mode

    @abc.abstractmethod
    def validate(self, config: ml_collections.ConfigDict, fail: Fail) -> None:
        """Checks its own section, and what it cannot do with the rest of the config."""

    # -- the run -----------------------------------------------------------------------------------------------

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

    def reference_misfit(self, config: ml_collections.ConfigDict) -> str | None:
        """Why an embedding of y^'s space (an encoder output; SSPS 'kmeans' puts a centroid of them there) cannot
        stand in the positive branch, or None when it can."""
        dim = self.positive_shape(config)[1]
        return None if dim == config.model.encoder_dim else f"a {dim}-dimensional positive branch"

    def eval_variables(self, state) -> dict:
        """The variables evaluation embeds with, and SSPS computes y^ with."""
        return {"params": state.params, "batch_stats": state.batch_stats}

    # -- the parts of its step (per device, inside shard_map; ssps_jax/train_step.py runs them) -----------------

    def target(self, state, batch: dict, *, model: nn.Module, settings) -> Target | None:
        """What a network the gradient does not train computes for this batch (teacher, momentum encoder)."""
        del state, batch, model, settings
        return None

    @abc.abstractmethod
    def forward(self, variables: dict, batch: dict, rng: jax.Array, *, model: nn.Module, settings) -> tuple[Any, Any]:
        """The trained networks on this device's batch, in training mode: (outputs, new batch_stats).

        `rng` is this device's key of the step, for stochastic layers.
        """

    def online_positive(self, outputs) -> jax.Array | None:
        """(V, n, D): the positive branch among the forward's outputs, when `target` gives none; None: no
        positive branch (SSPS does not apply)."""
        del outputs
        return None

    @abc.abstractmethod
    def loss(
        self, outputs, positive, *, variables: dict, state, batch: dict, target: Target | None, model, settings
    ) -> tuple[jax.Array, dict]:
        """(this device's loss, its per-device metrics) from the forward's outputs and the positive branch as
        used (V, n, D); the train step averages both over the mesh. `variables` are the forward's."""

    def update(self, state, params, outputs, positive, target: Target | None, *, settings) -> tuple[Any, dict]:
        """(the method state after the step, metrics that are the same on every device), given the new
        parameters, the forward's outputs and the positive branch the loss used.

        `params` and `state` are as the train state holds them: of a parameter split over the devices
        (update_sharding.py), and of the momentum entry's copy of it, this device's part, in float32. So an
        update may combine them element by element (an EMA), and nothing else."""
        del params, outputs, positive, target, settings
        return state.method_state, {}


def crop_samples(seconds: float) -> int:
    return round(seconds * 16000)


def views_input(seconds: float) -> jax.ShapeDtypeStruct:
    """(batch, views, samples) of one crop length: what the models are initialised with."""
    return jax.ShapeDtypeStruct((2, 2, crop_samples(seconds)), jnp.float32)
