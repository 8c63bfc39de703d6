"""The training state: everything a step reads and writes, and a checkpoint holds."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ssps_jax import update_sharding
from ssps_jax.ssps.state import SSPSState
from ssps_jax.ssps.state import partition_specs as ssps_partition_specs


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps taken
    params: Any
    batch_stats: Any  # BatchNorm running statistics
    opt_state: Any
    rng: jax.Array  # base PRNG key (raw uint32[2]); step keys are fold_in(rng, step)
    ssps: SSPSState | None = None  # memory queues and clustering, when SSPS is configured
    method_state: dict | None = None  # the method's own state (DINO: teacher and centre), see Method.init_state


def partition_specs(state: TrainState, method_specs: dict | None = None, split: dict | None = None) -> TrainState:
    """Layout of every field on the mesh: all replicated but the SSPS queues, the large parameters, their
    optimizer state and a momentum copy of them as `split` says (`split_specs`; None: replicated) and the rest of
    the method's state as `method_specs` does."""
    if method_specs is None and state.method_state is not None:
        method_specs = jax.tree.map(lambda _: P(), state.method_state)
    for entry, params in ({} if split is None else split.get("momentum", {})).items():
        method_specs = {**method_specs, entry: {**method_specs[entry], "params": params}}
    return TrainState(
        step=P(),
        params=P() if split is None else split["params"],
        batch_stats=P(),
        opt_state=P() if split is None else split["opt_state"],
        rng=P(),
        ssps=None if state.ssps is None else ssps_partition_specs(),
        method_state=method_specs,
    )


def as_dict(state: TrainState) -> dict:
    """What a checkpoint stores: the fields that are set, by name, with the SSPS state as a dict of its fields and
    the method's entries (DINO's `teacher`, `center`) as top-level fields of their own."""
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if getattr(state, f.name) is not None}
    if "ssps" in fields:
        fields["ssps"] = {f.name: getattr(state.ssps, f.name) for f in dataclasses.fields(state.ssps)}
    fields.update(fields.pop("method_state", {}))
    return fields


def from_dict(like: TrainState, fields: dict) -> TrainState:
    """`like` with the fields of `as_dict`'s layout replaced (the inverse of as_dict)."""
    own = {f.name for f in dataclasses.fields(like)}
    fields = dict(fields)
    method = {k: fields.pop(k) for k in list(fields) if k not in own}
    if "ssps" in fields:
        fields["ssps"] = like.ssps.replace(**fields["ssps"])
    if method:
        fields["method_state"] = {**like.method_state, **method}
    return like.replace(**fields)


def split_specs(state: TrainState, mesh: Mesh, min_size: int | None, momentum: str | None = None) -> dict | None:
    """{"params", "opt_state"[, "momentum"]}: the layouts of `state`'s parameters and optimizer state with the
    parameters of at least `min_size` elements split over `mesh` (update_sharding.py), and of the parameters of
    the method-state entry `momentum` (Method.momentum_entry, a momentum copy of the model), split the same way;
    None (`min_size` None): none is."""
    if min_size is None:
        return None
    specs = {
        "params": update_sharding.param_specs(state.params, mesh.size, min_size),
        "opt_state": update_sharding.opt_state_specs(state.opt_state, state.params, mesh.size, min_size),
    }
    if momentum is not None:
        copy = state.method_state[momentum]["params"]
        specs["momentum"] = {momentum: update_sharding.param_specs(copy, mesh.size, min_size)}
    return specs


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(the parameters' initialisation key, the state's base key `rng`) of a run with `seed`."""
    init_key, base_key = jax.random.split(jax.random.PRNGKey(seed))
    return init_key, base_key


def init_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    seed: int,
    example_input: jax.ShapeDtypeStruct,
    mesh: Mesh,
    init_method_state: Callable[[dict], dict | None] | None = None,
    method_specs: Callable[[dict], dict] | None = None,
    split_update_min_size: int | None = None,
    momentum_entry: str | None = None,
    abstract: bool = False,
) -> TrainState:
    """Initial state, created directly in its layout on `mesh` (identical on every process).

    `init_method_state(variables)` gives the method's own state from the freshly
    initialised {"params", "batch_stats"} (e.g. DINO's teacher, a copy of the
    student), laid out by `method_specs` (default: replicated) but for the parameters of its
    `momentum_entry`, split as the model's are (`split_specs`). `abstract`: the
    state's shapes and shardings only, no device memory (ahead-of-time compilation).
    """

    def init():
        init_key, base_key = seed_keys(seed)
        variables = model.init(init_key, jnp.zeros(example_input.shape, example_input.dtype), train=False)
        params = variables["params"]
        batch_stats = variables.get("batch_stats", {})
        method_state = None
        if init_method_state is not None:
            method_state = init_method_state({"params": params, "batch_stats": batch_stats})
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=tx.init(params),
            rng=base_key,
            method_state=method_state,
        )

    shapes = jax.eval_shape(init)
    specs = partition_specs(
        shapes,
        None if method_specs is None else method_specs(shapes.method_state),
        split_specs(shapes, mesh, split_update_min_size, momentum_entry),
    )
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
    jitted = jax.jit(init, out_shardings=shardings)
    return jitted.eval_shape() if abstract else jitted()
