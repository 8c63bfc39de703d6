"""Synthetic inputs of `ssps-jax bench`, made on the devices in the training layout.

Batches are synthetic random waveforms made on the devices, not grain: the
bench times the device step (`ssps-jax bench-input` times the input pipeline).
Queues are full (random unit vectors, bench/ssps.py's `random_queues`), so
that every step samples and replaces positives once the epoch is clustered.
The reference forward y^ is also made a program of its own, to time it alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipelines import input_pipeline
from ssps_jax import device_augment, methods, sharding
from ssps_jax.bench.ssps import Sizes, random_queues
from ssps_jax.ssps import step as ssps_step


def synthetic_batch(config: ml_collections.ConfigDict, mesh, dataset_size: int, seed: int) -> dict:
    """A global batch of random waveforms with the method's crops (docs/method.md §2) and distinct indices, split on
    `mesh`."""
    shapes = input_pipeline.batch_shapes(config.data, config.train.global_batch_size)
    del shapes["index"]  # distinct indices, drawn below

    def make():
        keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes) + 1)
        out = {}
        for key, (name, (shape, dtype)) in zip(keys, shapes.items()):
            x = 0.1 * jax.random.normal(key, shape)
            # data.augment.on = "device": int16 PCM crops, noises and RIRs (and float32 SNRs) for the step to augment
            out[name] = (x * device_augment.PCM_SCALE).astype(jnp.int16) if dtype == np.int16 else x
        batch = config.train.global_batch_size
        out["index"] = jax.random.choice(keys[-1], dataset_size, (batch,), replace=False).astype(jnp.int32)
        return out

    return jax.jit(make, out_shardings=sharding.split_batch(mesh))()


def full_queues(config: ml_collections.ConfigDict, mesh, sizes: Sizes, seed: int):
    """bench/ssps.py's random full queues, with the positive queue shaped for this method (views, dimension)."""
    state = random_queues(mesh, sizes, seed)
    views, dim = methods.get(config.method).positive_shape(config)
    if state.pos_emb.shape[0] == views and state.pos_emb.shape[-1] == dim:
        return state
    # A projector or DINO head: the positive queue holds (views, ..., dim) rows instead of encoder outputs.
    shape = (views, *state.pos_emb.shape[1:-1], dim)

    def unit():
        x = jax.random.normal(jax.random.PRNGKey(seed + 1), shape, jnp.float32)
        return (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(state.pos_emb.dtype)

    pos = jax.jit(unit, out_shardings=NamedSharding(mesh, P(None, None, sharding.DATA)))()
    return state.replace(pos_emb=pos)


def make_reference_embed(model, mesh):
    """(variables, reference crops) -> y^: the SSPS step's reference forward as a program of its own."""

    def embed(v, reference):
        reference = device_augment.waveform(reference)  # int16 with data.augment.on = "device"
        return ssps_step.normalise(model.apply(v, reference, method=type(model).embed))

    data = P(sharding.DATA)
    return jax.jit(jax.shard_map(embed, mesh=mesh, in_specs=(P(), data), out_specs=data, check_vma=False))
