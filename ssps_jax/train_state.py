"""The training state: everything a step reads and writes, and a checkpoint holds."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ssps_jax import sharding
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
    teacher: Any = None  # DINO: the teacher's {"params", "batch_stats"} (EMA of the student)
    center: jax.Array | None = None  # DINO: running mean of the teacher outputs (K,)


def partition_specs(state: TrainState) -> TrainState:
    """Layout of every field on the mesh: all replicated but the SSPS queues."""
    return TrainState(
        step=P(),
        params=P(),
        batch_stats=P(),
        opt_state=P(),
        rng=P(),
        ssps=None if state.ssps is None else ssps_partition_specs(),
        teacher=None if state.teacher is None else P(),
        center=None if state.center is None else P(),
    )


def as_dict(state: TrainState) -> dict:
    """Top-level fields that are set, by name, the SSPS state as a dict of its fields (what a checkpoint stores)."""
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if getattr(state, f.name) is not None}
    if "ssps" in fields:
        fields["ssps"] = {f.name: getattr(state.ssps, f.name) for f in dataclasses.fields(state.ssps)}
    return fields


def init_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    seed: int,
    example_views: jax.ShapeDtypeStruct,
    mesh: Mesh,
    teacher_outputs: int = 0,
) -> TrainState:
    """Initial state, created directly replicated on `mesh` (identical on every process).

    teacher_outputs > 0 (DINO): the teacher starts as a copy of the student,
    and the centre as zeros of that size.
    """

    def init():
        init_key, base_key = jax.random.split(jax.random.PRNGKey(seed))
        variables = model.init(init_key, jnp.zeros(example_views.shape, example_views.dtype), train=False)
        params = variables["params"]
        batch_stats = variables.get("batch_stats", {})
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=tx.init(params),
            rng=base_key,
            teacher={"params": params, "batch_stats": batch_stats} if teacher_outputs else None,
            center=jnp.zeros((teacher_outputs,), jnp.float32) if teacher_outputs else None,
        )

    return jax.jit(init, out_shardings=sharding.replicated(mesh))()
