"""One build of a run from its config: model, optimizer, state, SSPS and the step programs.

`train`, `evaluate` and `ssps-jax bench` all start here, so a run is built
one way whatever uses it: the method from the registry (methods/), its model
with BatchNorm synchronised over the `data` axis, its optimizer and
schedules laid out over `train.epochs` (its update split over the devices
where it allows: update_sharding.py), the initial train state directly in
its layout on the mesh (with the SSPS queues when `ssps.enabled`), the
partition specs, and the jitted shard_map step programs: the plain step and,
with SSPS, the SSPS step. `abstract=True` builds the same with shapes and
shardings only (no device memory), for ahead-of-time compilation.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from data_pipelines import input_pipeline
from data_pipelines.errors import ConfigError
from ssps_jax import methods, optim, sharding, update_sharding
from ssps_jax.methods.base import Method
from ssps_jax.ssps import sampling
from ssps_jax.ssps.lifecycle import SSPS
from ssps_jax.train_state import TrainState, init_train_state, partition_specs, split_specs
from ssps_jax.train_step import make_train_step


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything a run is made of but its state (build returns that beside it: the run must not hold on to it)."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    method: Method
    model: nn.Module
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    steps_per_epoch: int
    total_steps: int  # what the schedules span: train.epochs
    ssps: SSPS  # disabled unless config.ssps.enabled
    specs: TrainState
    plain_step: object  # jitted (state, batch, rng) -> (state, metrics)
    ssps_step: object | None  # the same with SSPS (queues live); None without SSPS

    def step_program(self, epoch: int):
        """The step program the steps of `epoch` run."""
        return self.ssps_step if self.ssps.fills_queues(epoch) else self.plain_step

    def eval_variables(self, state: TrainState) -> dict:
        """The variables evaluation embeds with (the teacher's for DINO), whole on every device: the train state
        holds its large parameters split (update_sharding.py); evaluation runs on replicated ones."""
        variables, copy = self.method.eval_variables(state), _replicated_copy(self.mesh)
        abstract = all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(variables))  # aot.py's
        return copy.eval_shape(variables) if abstract else copy(variables)


@functools.cache
def _replicated_copy(mesh: Mesh):
    """tree -> a copy of it whole on every device of `mesh` (jitted once per mesh; compiled once per layout)."""
    return jax.jit(lambda tree: tree, out_shardings=sharding.replicated(mesh))


def build(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    dataset_size: int,
    *,
    labels: tuple[np.ndarray, np.ndarray] | None = None,
    abstract: bool = False,
) -> tuple[Run, TrainState]:
    """(run, initial state) of `config` on `mesh` for a train split of `dataset_size` utterances.

    `labels` (speaker, session ids per dataset index) feed the SSPS
    diagnostics only. Nothing is compiled here: the step programs compile on
    their first call (or `.lower(...).compile()`).
    """
    method = methods.get(config.method)
    batch = config.train.global_batch_size
    per_epoch = input_pipeline.steps_per_epoch(dataset_size, batch)
    total = config.train.epochs * per_epoch
    model = method.build_model(config, bn_axis_name=sharding.DATA)
    tx, schedule = method.build_optimizer(config, per_epoch, total)
    speaker = _train_speakers(config, method, labels, dataset_size, abstract)
    from_labels = {} if speaker is None else method.label_state(config, speaker)

    def init_method_state(variables):
        state = method.init_state(config, variables)
        return {**(state or {}), **from_labels} if from_labels else state

    split = optim.split_min_size(config.optim)
    state = init_train_state(
        model,
        tx,
        config.seed,
        method.example_input(config),
        mesh,
        init_method_state=init_method_state,
        method_specs=method.state_specs,
        split_update_min_size=split,
        momentum_entry=method.momentum_entry,
        abstract=abstract,
    )
    ssps = SSPS.from_config(config.ssps, per_epoch, mesh)
    if ssps.enabled and sampling.get(ssps.sampling.method).needs_labels and not abstract:
        _check_sampling_labels(config, labels)
    queues = ssps.init_state(
        mesh,
        dataset_size=dataset_size,
        global_batch=batch,
        ref_dim=config.model.encoder_dim,
        positive_shape=method.positive_shape(config),
        labels=labels,
        abstract=abstract,
    )
    state = state.replace(ssps=queues)
    specs = partition_specs(
        state,
        None if state.method_state is None else method.state_specs(state.method_state),
        split_specs(state, mesh, split, method.momentum_entry),
    )
    axes = update_sharding.split_axes(state.params, mesh.size, split)
    settings = method.settings(config, per_epoch, total)
    dtype = jnp.dtype(config.model.dtype)
    step = functools.partial(
        make_train_step,
        method,
        model,
        tx,
        mesh,
        settings,
        specs,
        update_axes=axes,
        compute_dtype=dtype,
        reduce_in_float32=config.optim.reduce_gradients_in_float32,
    )
    plain_step, ssps_step = step(), step(ssps) if ssps.enabled else None
    run = Run(
        config=config,
        mesh=mesh,
        method=method,
        model=model,
        tx=tx,
        schedule=schedule,
        steps_per_epoch=per_epoch,
        total_steps=total,
        ssps=ssps,
        specs=specs,
        plain_step=plain_step,
        ssps_step=ssps_step,
    )
    return run, state


def _train_speakers(config, method: Method, labels, dataset_size: int, abstract: bool) -> np.ndarray | None:
    """The speaker id of every train index for a method trained on labels (None for the others)."""
    if not method.needs_labels:
        return None
    if abstract and labels is None:
        return np.zeros(dataset_size, np.int32)  # only its shape is used
    unlabelled = dataset_size if labels is None else int(np.sum(labels[0] < 0))
    if unlabelled:
        raise ConfigError(
            f"config.method: {config.method} trains on speaker labels, but {unlabelled} of the {dataset_size} "
            f"utterances of {config.data.train_csv} have none (its index file lists no Speaker for them)"
        )
    return labels[0]


def _check_sampling_labels(config, labels) -> None:
    """A sampler that draws by speaker and session (oracle) cannot run on a corpus whose index file has none."""
    labels = labels or (None, None)
    missing = [name for name, ids in zip(("Speaker", "Session"), labels) if ids is None or ids.max() < 0]
    if missing:
        raise ConfigError(
            f"config.ssps.sampling: {config.ssps.sampling} needs speaker and session labels, but the index file of "
            f"{config.data.train_csv} lists no {' / '.join(missing)} for any utterance"
        )


def build_for_inference(
    config: ml_collections.ConfigDict, mesh: Mesh, *, abstract: bool = False
) -> tuple[Method, nn.Module, TrainState]:
    """(method, model, state) to restore a checkpoint's model into and embed with: no optimizer state, no SSPS.

    The state's `opt_state` and `ssps` are None, so a checkpoint restore leaves them out. `abstract`: shapes
    and shardings only (nothing compiled or allocated), e.g. to convert a checkpoint's arrays into its layout.
    """
    method = methods.get(config.method)
    model = method.build_model(config, bn_axis_name=sharding.DATA)
    state = init_train_state(
        model,
        optax.identity(),
        config.seed,
        method.example_input(config),
        mesh,
        init_method_state=lambda variables: method.init_state(config, variables),
        method_specs=method.state_specs,
        abstract=abstract,
    )
    return method, model, state.replace(opt_state=None)
