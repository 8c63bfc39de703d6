"""The training state: everything a step reads and writes, and a checkpoint holds."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from ssps_jax import sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps taken
    params: Any
    batch_stats: Any  # BatchNorm running statistics
    opt_state: Any
    rng: jax.Array  # base PRNG key (raw uint32[2]); step keys are fold_in(rng, step)


def init_train_state(
    model: nn.Module, tx: optax.GradientTransformation, seed: int, example_views: jax.ShapeDtypeStruct, mesh: Mesh
) -> TrainState:
    """Initial state, created directly replicated on `mesh` (identical on every process)."""

    def init():
        init_key, base_key = jax.random.split(jax.random.PRNGKey(seed))
        variables = model.init(init_key, jnp.zeros(example_views.shape, example_views.dtype), train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            rng=base_key,
        )

    return jax.jit(init, out_shardings=sharding.replicated(mesh))()
