"""The sharded train step on 8 devices equals the same global batch on 1 device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import tiny_config

from ssps_jax import sharding
from ssps_jax.methods import simclr
from ssps_jax.train_state import init_train_state, partition_specs
from ssps_jax.train_step import make_train_step


def _max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def test_sharded_step_equals_single_device(demo_dir):
    config = tiny_config(demo_dir)
    config.simclr.projector = True  # BatchNorm in the projector too
    config.simclr.projector_hidden_dim = 32
    config.simclr.projector_output_dim = 8
    model = simclr.METHOD.build_model(config, bn_axis_name=sharding.DATA)
    # SGD with learning rate 1: the parameter change *is* the (averaged) gradient.
    tx = optax.sgd(1.0)
    views = np.random.default_rng(0).normal(size=(16, 2, 4000)).astype(np.float32)
    example = jax.ShapeDtypeStruct((2, 2, 4000), jnp.float32)
    initial = jax.device_get(init_train_state(model, tx, 0, example, sharding.make_mesh(jax.devices()[:1])))
    results = {}
    for devices in (8, 1):
        mesh = sharding.make_mesh(jax.devices()[:devices])
        state = jax.device_put(initial, sharding.replicated(mesh))
        before = initial
        step = make_train_step(simclr.METHOD, model, tx, mesh, simclr.SimCLRSettings(0.1), partition_specs(state))
        after, metrics = step(state, sharding.global_batch({"views": views}, mesh), jax.random.PRNGKey(0))
        after = jax.device_get(after)
        grads = jax.tree.map(lambda b, a: b - a, before.params, after.params)
        results[devices] = (float(metrics["loss"]), grads, after.batch_stats, float(metrics["grad_norm"]))
        assert int(after.step) == 1

    (loss8, grads8, stats8, norm8), (loss1, grads1, stats1, norm1) = results[8], results[1]
    assert abs(loss8 - loss1) < 1e-5 * abs(loss1)
    scale = max(jax.tree.leaves(jax.tree.map(lambda g: float(np.max(np.abs(g))), grads1)))
    assert _max_diff(grads8, grads1) < 1e-4 * scale
    assert abs(norm8 - norm1) < 1e-4 * norm1
    # Synchronised BN: running statistics from the global batch, identical on 1 or 8 devices.
    assert _max_diff(stats8, stats1) < 1e-5
    # ... and different from what per-device statistics would have given: they moved.
    assert _max_diff(stats1, initial.batch_stats) > 1e-3
