"""DINO: loss against NumPy, centring / EMA / schedules by hand, optimizer rules, sharded == 1 device, SSPS."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_dino_config
from jax.sharding import NamedSharding

from ssps_jax import sharding, update_sharding
from ssps_jax.methods import common, dino
from ssps_jax.optim import clip_each_by_norm
from ssps_jax.ssps import sampling
from ssps_jax.ssps.lifecycle import SSPS
from ssps_jax.ssps.state import init_ssps_state
from ssps_jax.train_state import init_train_state, partition_specs, split_specs
from ssps_jax.train_step import make_train_step

METHOD = dino.METHOD


def _init_state(config, model, tx, example, mesh):
    return init_train_state(model, tx, 0, example, mesh, lambda variables: METHOD.init_state(config, variables))


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _dino_loss_numpy(student, teacher, center, ts, tt):
    """sslsv's DINOLoss.forward, written with loops: teacher view j against every student view i != j."""
    log_p = [np.log(_softmax(s / ts)) for s in student.astype(np.float64)]
    q = [_softmax((t - center) / tt) for t in teacher.astype(np.float64)]
    terms = [np.mean(np.sum(-q[j] * log_p[i], axis=-1)) for j in range(len(q)) for i in range(len(log_p)) if i != j]
    return np.mean(terms)


@pytest.mark.parametrize("teacher_temperature", [0.04, 0.07])
def test_dino_loss_matches_numpy(teacher_temperature):
    rng = np.random.default_rng(0)
    student = rng.normal(size=(6, 5, 32)).astype(np.float32)
    teacher = rng.normal(size=(2, 5, 32)).astype(np.float32)
    center = 0.1 * rng.normal(size=32).astype(np.float32)
    got = float(dino.dino_loss(student, teacher, center, 0.1, teacher_temperature))
    assert got == pytest.approx(_dino_loss_numpy(student, teacher, center, 0.1, teacher_temperature), rel=1e-5)


def test_centre_ema_and_schedules_by_hand():
    teacher = np.array([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])  # (2 views, 2 examples, 2)
    center = np.array([10.0, -10.0])
    # mean over views and examples: (4, 5); 0.9 * center + 0.1 * mean
    np.testing.assert_allclose(dino.update_center(center, teacher, 0.9, None), [9.4, -8.5], rtol=1e-6)
    t, s = {"w": np.array([1.0, 2.0])}, {"w": np.array([3.0, 6.0])}
    np.testing.assert_allclose(common.ema(t, s, 0.75)["w"], [1.5, 3.0])
    # tau: 0.996 at step 0, 0.998 half way, 1 at the end (half cosine).
    taus = [float(common.momentum_tau(jnp.float32(step), 100, 0.996, 1.0)) for step in (0, 50, 100)]
    np.testing.assert_allclose(taus, [0.996, 0.998, 1.0], atol=1e-7)
    # Teacher temperature: sslsv's linspace(0.02, 0.04, 3) over epochs 0..2, then 0.04.
    temps = [float(dino.teacher_temperature(jnp.float32(e), 0.04, 0.02, 3)) for e in range(5)]
    np.testing.assert_allclose(temps, [0.02, 0.03, 0.04, 0.04, 0.04], rtol=1e-6)


def test_per_parameter_clipping_clips_each_tensor_alone():
    grads = {"a": np.array([3.0, 4.0]), "b": np.array([0.3, 0.4]), "c": np.full((2, 2), 10.0)}
    clipped, _ = clip_each_by_norm(3.0).update(grads, optax.EmptyState())
    np.testing.assert_allclose(clipped["a"], np.array([3.0, 4.0]) * 3 / (5 + 1e-6), rtol=1e-6)  # norm 5 -> 3
    np.testing.assert_allclose(clipped["b"], grads["b"])  # norm 0.5: untouched
    np.testing.assert_allclose(np.linalg.norm(clipped["c"]), 3.0, rtol=1e-5)


def test_last_layer_frozen_in_epoch_zero_and_no_decay_on_1d_parameters(demo_dir):
    config = tiny_dino_config(demo_dir)
    config.optim.clip_grad_per_param = 0.0
    tx, _ = METHOD.build_optimizer(config, steps_per_epoch=3, total_steps=9)
    params = {
        "head": {"last_layer": {"weight_v": np.ones((2, 2))}, "mlp": {"layers_0": {"kernel": np.ones((2, 2))}}},
        "norm": {"scale": np.ones(2)},
    }
    zero = jax.tree.map(np.zeros_like, params)
    state = tx.init(params)
    moved = []
    for _ in range(5):
        # Zero gradients: only weight decay can move parameters, and it must spare the 1-D scale.
        updates, state = tx.update(zero, state, params)
        moved.append({k: float(np.abs(v).max()) for k, v in _flat(updates).items()})
        assert moved[-1]["norm/scale"] == 0.0
    # Epoch 0 (steps 0-2): the last layer does not move at all; afterwards weight decay reaches it.
    assert [m["head/last_layer/weight_v"] for m in moved[:3]] == [0.0, 0.0, 0.0]
    assert moved[3]["head/last_layer/weight_v"] == pytest.approx(0.2 * 5e-5)
    assert moved[0]["head/mlp/layers_0/kernel"] == pytest.approx(0.2 * 5e-5)


def _flat(tree):
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def _max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def _batch(rng, n, config):
    c = config.data.crops
    g, loc = round(c.global_seconds * 16000), round(c.local_seconds * 16000)
    return {
        "global_views": rng.normal(size=(n, 2, g)).astype(np.float32),
        "local_views": rng.normal(size=(n, 4, loc)).astype(np.float32),
        "reference": rng.normal(size=(n, round(c.reference_seconds * 16000))).astype(np.float32),
        "index": np.arange(n, dtype=np.int32),
    }


def test_sharded_dino_step_equals_single_device(demo_dir):
    """On 8 devices the student's kernels and the teacher's copy of them are held split (update_sharding.py):
    the teacher is gathered for its forward, and its EMA runs on each device's part.

    In float64: DINO's sharp teacher softmax (temperature 0.04) amplifies the float32 rounding of
    differently ordered reductions to ~1e-2 relative on some gradients, which would hide a real error."""
    config = tiny_dino_config(demo_dir)
    config.model.dtype = "float64"
    with jax.enable_x64(True):
        model = METHOD.build_model(config, bn_axis_name=sharding.DATA)
        tx = optax.sgd(1.0)  # the parameter change *is* the averaged gradient
        settings = METHOD.settings(config, steps_per_epoch=10, total_steps=100)
        batch = _batch(np.random.default_rng(0), 16, config)
        batch = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in batch.items()}
        outputs = config.dino.head_output_dim
        example = jax.ShapeDtypeStruct(METHOD.example_input(config).shape, jnp.float64)
        initial = jax.device_get(_init_state(config, model, tx, example, sharding.make_mesh(jax.devices()[:1])))
        initial = jax.tree.map(lambda x: x.astype(np.float64) if x.dtype == np.float32 else x, initial)
        initial = initial.replace(
            method_state={**initial.method_state, "center": np.linspace(-1, 1, outputs)},
            opt_state=tx.init(initial.params),
        )
        results = {}
        for devices in (8, 1):
            mesh = sharding.make_mesh(jax.devices()[:devices])
            specs = partition_specs(initial, split=split_specs(initial, mesh, 64, METHOD.momentum_entry))
            state = jax.device_put(initial, jax.tree.map(functools.partial(NamedSharding, mesh), specs))
            axes = update_sharding.split_axes(initial.params, mesh.size, 64)
            step = make_train_step(
                METHOD, model, tx, mesh, settings, specs, update_axes=axes, compute_dtype=jnp.float64
            )
            after, metrics = step(state, sharding.global_batch(batch, mesh), jax.random.PRNGKey(0))
            kernel = after.method_state["teacher"]["params"]["head"]["last_layer"]["weight_v"]
            assert kernel.sharding.is_fully_replicated == (devices == 1)
            results[devices] = (jax.device_get(after), float(metrics["loss"]))
    (a8, loss8), (a1, loss1) = results[8], results[1]
    assert a1.params["head"]["last_layer"]["weight_v"].dtype == np.float64
    assert loss8 == pytest.approx(loss1, rel=1e-9)
    grads1 = jax.tree.map(lambda b, a: b - a, initial.params, a1.params)
    scale = max(jax.tree.leaves(jax.tree.map(lambda g: float(np.max(np.abs(g))), grads1)))
    assert _max_diff(a8.params, a1.params) < 1e-6 * scale
    assert _max_diff(a8.batch_stats, a1.batch_stats) < 1e-9  # student BN over the global batch
    assert _max_diff(a8.method_state["teacher"], a1.method_state["teacher"]) < 1e-9  # EMA and teacher BN statistics
    np.testing.assert_allclose(a8.method_state["center"], a1.method_state["center"], atol=1e-12)
    # The teacher moved towards the student by (1 - tau): tau = 0.996 at step 0.
    bias = "head/mlp/layers_6/bias"
    np.testing.assert_allclose(
        _flat(a1.method_state["teacher"]["params"])[bias],
        0.996 * _flat(initial.params)[bias] + 0.004 * _flat(a1.params)[bias],
    )


def test_ssps_replaces_both_teacher_views_before_the_loss_and_queues_the_originals(demo_dir):
    """Each anchor's only candidate is a known queue row: both teacher outputs become its two views."""
    config = tiny_dino_config(demo_dir)
    model = METHOD.build_model(config, bn_axis_name=sharding.DATA)
    tx = optax.sgd(0.0)
    n, k, per_epoch = 16, config.dino.head_output_dim, 4
    mesh = sharding.make_mesh()
    state = _init_state(config, model, tx, METHOD.example_input(config), mesh)
    queues = init_ssps_state(
        mesh,
        dataset_size=64,
        global_batch=n,
        ref_capacity=2 * n,
        pos_capacity=2 * n,
        ref_dim=config.model.encoder_dim,
        pos_dim=k,
        views=2,
        clusters=64,
        neighbours=0,
        dtype=jnp.float32,
        speaker=np.full(64, -1),
        session=np.full(64, -1),
    )
    rng = np.random.default_rng(1)
    pos_emb = rng.normal(size=(2, 2, n, k)).astype(np.float32)  # (views, blocks, rows, K)
    pos_index = np.arange(32, 64, dtype=np.int32).reshape(2, n)  # dataset indices 32..63
    fields = {
        "pos_emb": pos_emb,
        "pos_index": pos_index,
        "assignment": np.arange(64, dtype=np.int32),  # every index its own cluster
        "neighbours": np.arange(64, dtype=np.int32)[:, None],  # M = 0
        "clustered_epoch": np.int32(1),
    }
    queues = queues.replace(**{f: jax.device_put(v, getattr(queues, f).sharding) for f, v in fields.items()})
    step_in_epoch = 1
    state = state.replace(ssps=queues, step=jax.device_put(jnp.int32(per_epoch + step_in_epoch), state.step.sharding))
    batch = _batch(rng, n, config)
    batch["index"] = np.arange(32, 48, dtype=np.int32)  # queue rows of block 0
    settings = METHOD.settings(config, steps_per_epoch=per_epoch, total_steps=10 * per_epoch)
    ssps = SSPS(sampling.SamplingConfig("kmeans-repr", inter_size=0), start_epoch=1, steps_per_epoch=per_epoch)
    step = make_train_step(METHOD, model, tx, mesh, settings, partition_specs(state), ssps)
    before = jax.device_get(state)
    after, metrics = jax.device_get(step(state, sharding.global_batch(batch, mesh), jax.random.PRNGKey(0)))
    assert float(metrics["ssps/coverage"]) == 1.0
    # The centre moved towards the mean of the *replaced* teacher outputs: queue block 0, both views.
    center = before.method_state["center"]
    expected = 0.9 * center + 0.1 * pos_emb[:, 0].mean(axis=(0, 1))
    np.testing.assert_allclose(after.method_state["center"], expected, rtol=1e-5, atol=1e-6)
    # The loss is DINO's with the queue rows as teacher outputs (reference computed on one device).
    local = METHOD.build_model(config)
    student = local.apply(
        {"params": before.params, "batch_stats": before.batch_stats},
        batch["global_views"],
        batch["local_views"],
        method=dino.DINO.student,
        mutable=["batch_stats"],
    )[0]
    want = _dino_loss_numpy(np.asarray(student), pos_emb[:, 0], center, 0.1, 0.04)
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-4)
    # Both original teacher outputs went into block step_in_epoch of the positive queue.
    teacher_out = local.apply(
        before.method_state["teacher"], batch["global_views"], train=True, mutable=["batch_stats"]
    )[0]
    # (8-device vs 1-device BatchNorm: float32 rounding of ~2e-5; the replacements are O(1) normals.)
    np.testing.assert_allclose(after.ssps.pos_emb[:, step_in_epoch], teacher_out, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(after.ssps.pos_index[step_in_epoch], batch["index"])
