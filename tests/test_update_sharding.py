"""The optimizer update split over the devices (update_sharding.py) makes the whole update's numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from jax.sharding import PartitionSpec as P

from ssps_jax import optim, sharding, update_sharding
from ssps_jax.methods import simclr
from ssps_jax.train_state import init_train_state, opt_specs, partition_specs
from ssps_jax.train_step import make_train_step


def test_split_axes_takes_the_largest_axis_the_device_count_divides_of_large_leaves():
    shapes = {
        "conv": jax.ShapeDtypeStruct((3, 1024, 512), jnp.float32),
        "odd": jax.ShapeDtypeStruct((1, 1000, 6), jnp.float32),  # no axis divisible by 16
        "bias": jax.ShapeDtypeStruct((1024,), jnp.float32),  # too small
        "wide": jax.ShapeDtypeStruct((48, 4096), jnp.float32),
    }
    assert update_sharding.split_axes(shapes, 16, 4096) == {"conv": 1, "odd": None, "bias": None, "wide": 1}
    assert update_sharding.split_axes(shapes, 3, 4096) == {"conv": 0, "odd": 2, "bias": None, "wide": 0}
    assert update_sharding.split_axes(shapes, 1, 4096) == dict.fromkeys(shapes)
    assert update_sharding.split_axes(shapes, 16, None) == dict.fromkeys(shapes)


@pytest.mark.parametrize("optimizer, clip", [("adamw", 0.0), ("sgd", 0.1)])
def test_split_update_equals_the_whole_update_and_holds_an_eighth_of_the_state(demo_dir, optimizer, clip):
    """Two steps on 8 devices with weight decay on the weights: AdamW; SGD with momentum and both clippings (the
    global norm, then each tensor's, as DINO's). The same parameters, optimizer state and gradient norms
    whether each device updates all of every parameter or its eighth of the split ones.

    (Not AdamW with clipping: the clipped gradients' smallest elements come near Adam's epsilon, where
    m / (sqrt(v) + eps) magnifies the summation-order differences of the two ways to about 1e-5 absolute.)
    """
    config = tiny_config(demo_dir)
    config.optim.optimizer, config.optim.weight_decay, config.optim.decay_biases_and_norms = optimizer, 0.1, False
    config.optim.clip_grad_norm, config.optim.clip_grad_per_param = clip, clip / 10
    model = simclr.METHOD.build_model(config, bn_axis_name=sharding.DATA)
    tx, _ = optim.make_optimizer(config.optim, 10, 100)
    mesh = sharding.make_mesh()
    example = jax.ShapeDtypeStruct((2, 2, 4000), jnp.float32)
    views = np.random.default_rng(0).normal(size=(2, 16, 2, 4000)).astype(np.float32)
    results = {}
    for min_size in (None, config.optim.split_update_min_size):
        state = init_train_state(model, tx, 0, example, mesh, split_update_min_size=min_size)
        axes = update_sharding.split_axes(state.params, mesh.size, min_size)
        specs = partition_specs(state, opt_specs=opt_specs(state, mesh, min_size))
        step = make_train_step(simclr.METHOD, model, tx, mesh, simclr.SimCLRSettings(0.1), specs, update_axes=axes)
        norms = []
        for batch in views:
            state, metrics = step(state, sharding.global_batch({"views": batch}, mesh), jax.random.PRNGKey(0))
            norms.append(float(metrics["grad_norm"]))
        results[min_size] = (axes, state, norms)

    (_, whole, whole_norms), (axes, split, split_norms) = results[None], results[64]
    split_leaves = [a for a in jax.tree.leaves(axes, is_leaf=lambda x: x is None) if a is not None]
    assert len(split_leaves) >= 8  # the tiny ECAPA-TDNN's kernels
    np.testing.assert_allclose(split_norms, whole_norms, rtol=1e-5)
    assert min(whole_norms) > 10 * clip  # with clipping: the global one scaled every step
    for name, a, b in (("params", whole.params, split.params), ("opt_state", whole.opt_state, split.opt_state)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-7, err_msg=name)
    # The parameters come back whole on every device; each device holds an eighth of a split leaf's moments.
    kernel = split.params["encoder"]["mfa"]["conv"]["conv"]["kernel"]
    assert kernel.sharding.is_fully_replicated
    moments = [x for x in jax.tree.leaves(split.opt_state) if x.shape == kernel.shape]  # Adam's mu, nu; a momentum
    assert len(moments) == (2 if optimizer == "adamw" else 1)
    for moment in moments:
        assert moment.sharding.spec == P(None, None, sharding.DATA)
        assert moment.addressable_shards[0].data.shape == (1, 16, 6)
    # The parameters moved: the two steps did something to compare.
    assert not np.allclose(
        np.asarray(kernel),
        np.asarray(init_train_state(model, tx, 0, example, mesh).params["encoder"]["mfa"]["conv"]["conv"]["kernel"]),
    )
