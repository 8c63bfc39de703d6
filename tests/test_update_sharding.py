"""The optimizer update split over the devices (update_sharding.py) makes the whole update's numbers."""

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config, tiny_dino_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipelines import input_pipeline
from ssps_jax import optim, sharding, update_sharding
from ssps_jax.build import build
from ssps_jax.methods import simclr
from ssps_jax.train_state import init_train_state, partition_specs, split_specs
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


def _two_steps(config, min_size, seed=0):
    """Two SimCLR steps of `config`'s model on 8 devices, the parameters of at least `min_size` elements split
    (None: none), in config.model.dtype, the gradients averaged as config.optim says: its split axes, first
    parameters (host copies), last state, metrics of each step and StableHLO."""
    model = simclr.METHOD.build_model(config, bn_axis_name=sharding.DATA)
    tx, _ = optim.make_optimizer(config.optim, 10, 100)
    mesh = sharding.make_mesh()
    example = jax.ShapeDtypeStruct((2, 2, 4000), jnp.float32)
    state = init_train_state(model, tx, 0, example, mesh, split_update_min_size=min_size)
    first = jax.tree.map(np.asarray, state.params)
    axes = update_sharding.split_axes(state.params, mesh.size, min_size)
    specs = partition_specs(state, split=split_specs(state, mesh, min_size))
    settings, dtype = simclr.SimCLRSettings(0.1), jnp.dtype(config.model.dtype)
    in_float32 = config.optim.reduce_gradients_in_float32
    step = make_train_step(simclr.METHOD, model, tx, mesh, settings, specs, None, axes, dtype, in_float32)
    views = np.random.default_rng(seed).normal(size=(2, 16, 2, 4000)).astype(np.float32)
    batches = [sharding.global_batch({"views": batch}, mesh) for batch in views]
    text = step.lower(state, batches[0], jax.random.PRNGKey(0)).as_text()
    metrics = []
    for batch in batches:
        state, m = step(state, batch, jax.random.PRNGKey(0))
        metrics.append({k: float(v) for k, v in m.items()})
    return types.SimpleNamespace(axes=axes, first=first, state=state, metrics=metrics, text=text)


def _split_shapes(run, ndim):
    """The shapes ("AxB", as StableHLO writes them before the dtype) of a run's split parameters of `ndim` axes
    (2: the kernels and up; 1: the vectors)."""
    leaves = zip(jax.tree.leaves(run.first), jax.tree.leaves(run.axes, is_leaf=lambda x: x is None))
    return {"x".join(map(str, p.shape)) for p, a in leaves if a is not None and min(p.ndim, 2) == ndim}


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
    whole_run, split_run = _two_steps(config, None), _two_steps(config, 64)
    whole, split, axes = whole_run.state, split_run.state, split_run.axes
    whole_norms, split_norms = [m["grad_norm"] for m in whole_run.metrics], [m["grad_norm"] for m in split_run.metrics]
    split_leaves = [a for a in jax.tree.leaves(axes, is_leaf=lambda x: x is None) if a is not None]
    assert len(split_leaves) >= 8  # the tiny ECAPA-TDNN's kernels
    np.testing.assert_allclose(split_norms, whole_norms, rtol=1e-5)
    assert min(whole_norms) > 10 * clip  # with clipping: the global one scaled every step
    for name, a, b in (("params", whole.params, split.params), ("opt_state", whole.opt_state, split.opt_state)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-7, err_msg=name)
    # Each device holds an eighth of a split leaf and of its moments; a small leaf whole.
    kernel = split.params["encoder"]["mfa"]["conv"]["conv"]["kernel"]
    moments = [x for x in jax.tree.leaves(split.opt_state) if x.shape == kernel.shape]  # Adam's mu, nu; a momentum
    assert len(moments) == (2 if optimizer == "adamw" else 1)
    for leaf in (kernel, *moments):
        assert leaf.sharding.spec == P(None, None, sharding.DATA)
        assert leaf.addressable_shards[0].data.shape == (1, 16, 6)
    assert split.params["encoder"]["mfa"]["conv"]["conv"]["bias"].sharding.is_fully_replicated
    # The parameters moved: the two steps did something to compare.
    assert not np.allclose(np.asarray(kernel), split_run.first["encoder"]["mfa"]["conv"]["conv"]["kernel"])


def test_a_bfloat16_step_gathers_the_split_parameters_in_bfloat16_and_computes_what_the_whole_one_does(demo_dir):
    """The split kernels are gathered after their cast to the compute dtype (half the bytes of a float32
    gather): the model gets the values its layers' own casts gave it, so two bfloat16 steps end where the
    unsplit ones do, up to the order of the gradients' sums. (Casting the split BatchNorm vectors too moved the
    second loss by 6e-4.) The gradients are averaged in float32 here, as the whole step's are."""
    config = tiny_config(demo_dir)
    config.model.dtype, config.optim.reduce_gradients_in_float32 = "bfloat16", True
    whole_run, split_run = _two_steps(config, None, seed=1), _two_steps(config, 64, seed=1)
    whole, state = whole_run.state, split_run.state
    # Every split kernel is gathered in bfloat16, none in float32 (the loss's gather of embeddings aside); a split
    # vector (BatchNorm's, used in float32) in float32.
    gathered = set(re.findall(r"all_gather.*?-> tensor<([^>]*)>", split_run.text))
    kernels, vectors = _split_shapes(split_run, 2), _split_shapes(split_run, 1)
    assert kernels and vectors
    assert {s + "xbf16" for s in kernels} <= gathered and not {s + "xf32" for s in kernels} & gathered, gathered
    assert {s + "xf32" for s in vectors} <= gathered, gathered
    losses = [[m["loss"] for m in run.metrics] for run in (split_run, whole_run)]
    np.testing.assert_allclose(*losses, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(whole.params), jax.tree.leaves(state.params)):
        assert y.dtype == x.dtype == jnp.float32  # the masters stay float32
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-7)


def test_a_bfloat16_step_averages_the_gathered_kernels_gradients_in_bfloat16_close_to_float32(demo_dir):
    """By default the gradients of the kernels gathered in bf16 are reduce-scattered in bf16 (half the bytes);
    `optim.reduce_gradients_in_float32` reduces them in float32. Two steps end within bf16's rounding of each
    other: the losses and gradient norms to 1e-4, the parameters to a hundredth of what the steps moved them
    (measured: the same losses, norms 2e-5 apart, parameters 0.16% of the move)."""
    config = tiny_config(demo_dir)
    config.model.dtype = "bfloat16"
    config.optim.reduce_gradients_in_float32 = True
    wide = _two_steps(config, 64, seed=2)
    config.optim.reduce_gradients_in_float32 = False
    narrow = _two_steps(config, 64, seed=2)
    kernels = _split_shapes(narrow, 2)
    assert kernels

    def reduced(run):
        """The whole shapes and dtypes of the reduce-scattered arrays."""
        return set(re.findall(r"reduce_scatter\".*?\}\) : \(tensor<([^>]*)>\)", run.text, re.S))

    assert {k + "xbf16" for k in kernels} <= reduced(narrow) and not {k + "xf32" for k in kernels} & reduced(narrow)
    assert {k + "xf32" for k in kernels} <= reduced(wide) and not {k + "xbf16" for k in kernels} & reduced(wide)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(*[[m[key] for m in run.metrics] for run in (narrow, wide)], rtol=1e-4)
    moved = max(
        float(np.max(np.abs(np.asarray(p) - f)))
        for p, f in zip(jax.tree.leaves(wide.state.params), jax.tree.leaves(wide.first))
    )
    for x, y in zip(jax.tree.leaves(wide.state.params), jax.tree.leaves(narrow.state.params)):
        assert y.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=0.01 * moved)
    assert any(
        not np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(wide.state.params), jax.tree.leaves(narrow.state.params))
    )


def test_a_teacher_is_held_split_and_gathered_in_bfloat16_like_the_student(demo_dir):
    """DINO's teacher, a momentum copy of the model, is held split as the student is: the bfloat16 step gathers
    each split kernel twice in bfloat16 (student, teacher) and never in float32: its EMA runs on the parts.
    (Lowered only: the numbers are test_dino's sharded == 1 device, which holds the teacher split too.)"""
    config = tiny_dino_config(demo_dir)
    config.model.dtype = "bfloat16"
    mesh = sharding.make_mesh()
    run, state = build(config, mesh, 64, abstract=True)
    teacher = state.method_state["teacher"]["params"]
    assert (
        teacher["head"]["last_layer"]["weight_v"].sharding.spec
        == state.params["head"]["last_layer"]["weight_v"].sharding.spec
        == P(None, sharding.DATA)
    )
    split = {p.shape: p for p in jax.tree.leaves(state.params) if not p.sharding.is_fully_replicated}
    kernels = {"x".join(map(str, shape)) for shape, p in split.items() if p.ndim >= 2}
    batch = {
        name: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(sharding.DATA)))
        for name, (shape, dtype) in input_pipeline.batch_shapes(config.data, 16).items()
    }
    text = run.plain_step.lower(state, batch, jax.ShapeDtypeStruct((2,), jnp.uint32)).as_text()
    gathered = re.findall(r"all_gather.*?-> tensor<([^>]*)>", text)
    assert kernels
    for kernel in kernels:
        assert gathered.count(kernel + "xbf16") == 2 * sum(
            "x".join(map(str, p.shape)) == kernel for p in jax.tree.leaves(state.params) if p.ndim >= 2
        ), kernel
        assert kernel + "xf32" not in gathered, kernel


def test_evaluation_reads_the_parameters_whole_from_a_state_that_holds_them_split(demo_dir):
    run, state = build(tiny_config(demo_dir), sharding.make_mesh(), 64)
    kernel = state.params["encoder"]["mfa"]["conv"]["conv"]["kernel"]
    assert kernel.sharding.spec == P(None, None, sharding.DATA)
    whole = run.eval_variables(state)["params"]["encoder"]["mfa"]["conv"]["conv"]["kernel"]
    assert whole.sharding.is_fully_replicated and whole.addressable_shards[0].data.shape == kernel.shape
    np.testing.assert_array_equal(np.asarray(whole.addressable_shards[0].data), np.asarray(kernel))
