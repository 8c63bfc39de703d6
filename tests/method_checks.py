"""Checks every method's tests share: one step on 8 devices == on 1, SSPS queues with a known candidate,
a tiny siamese config and batch, and resuming a run in its SSPS epoch."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ssps_jax import sharding, update_sharding
from ssps_jax import train as train_lib
from ssps_jax.ssps import sampling
from ssps_jax.ssps.lifecycle import SSPS
from ssps_jax.ssps.state import init_ssps_state
from ssps_jax.train_state import init_train_state, partition_specs, split_specs
from ssps_jax.train_step import make_train_step

N = 16  # global batch of the step checks: 2 examples per device on 8
STEPS_PER_EPOCH = 4  # of the step checks' schedules


def tiny_method_config(demo_dir, method: str):
    """tiny_config (SimCLR's) trained with `method`, its preset applied."""
    from ssps_jax.config import use_method

    config = use_method(tiny_config(demo_dir), method)
    config.data.crops.reference_seconds = 1.0
    return config


def siamese_batch(rng: np.random.Generator, n: int, config) -> dict:
    c = config.data.crops
    return {
        "views": rng.normal(size=(n, 2, round(c.frame_seconds * 16000))).astype(np.float32),
        "reference": rng.normal(size=(n, round(c.reference_seconds * 16000))).astype(np.float32),
        "index": np.arange(32, 32 + n, dtype=np.int32),  # queue rows of block 0 (known_candidate_queues)
    }


def _place(state, mesh, method, split_min_size=None):
    method_specs = None if state.method_state is None else method.state_specs(state.method_state)
    split = split_specs(state, mesh, split_min_size, method.momentum_entry)
    specs = partition_specs(state, method_specs, split)
    return jax.device_put(state, jax.tree.map(lambda s: NamedSharding(mesh, s), specs)), specs


def initial_state(method, config, model, tx, mesh):
    example = method.example_input(config)
    dtype = jnp.dtype(config.model.dtype)
    example = jax.ShapeDtypeStruct(example.shape, dtype)
    state = init_train_state(model, tx, 0, example, mesh, lambda v: method.init_state(config, v), method.state_specs)
    state = jax.device_get(state)
    if dtype == jnp.float64:
        state = jax.tree.map(lambda x: x.astype(np.float64) if x.dtype == np.float32 else x, state)
        state = state.replace(opt_state=tx.init(state.params))
    return state


def known_candidate_queues(mesh, positive_shape, ref_dim, rng, dtype=jnp.float32):
    """Queues where each anchor (dataset index 32 + i) has one candidate: positive row i of block 0.

    Every index is its own cluster and M = 0: the candidates of an anchor are the
    positive-queue rows of its own index, and indices 32..63 fill the queue's two blocks.
    Returns (queues, the positive rows (V, 2 blocks, N, D)).
    """
    views, dim = positive_shape
    queues = init_ssps_state(
        mesh,
        dataset_size=64,
        global_batch=N,
        ref_capacity=2 * N,
        pos_capacity=2 * N,
        ref_dim=ref_dim,
        pos_dim=dim,
        views=views,
        clusters=64,
        neighbours=0,
        dtype=dtype,
        speaker=np.full(64, -1),
        session=np.full(64, -1),
    )
    pos_emb = rng.normal(size=(views, 2, N, dim)).astype(np.dtype(dtype))
    fields = {
        "pos_emb": pos_emb,
        "pos_index": np.arange(32, 64, dtype=np.int32).reshape(2, N),
        "assignment": np.arange(64, dtype=np.int32),
        "neighbours": np.arange(64, dtype=np.int32)[:, None],
        "clustered_epoch": np.int32(1),
    }
    queues = queues.replace(**{f: jax.device_put(v, getattr(queues, f).sharding) for f, v in fields.items()})
    return queues, pos_emb


SSPS_ONE_CANDIDATE = SSPS(sampling.SamplingConfig("kmeans-repr", inter_size=0), start_epoch=1, steps_per_epoch=4)


def step_on(method, config, model, tx, state, batch, devices: int, ssps: SSPS | None = None, split_min_size=None):
    """(state after one step, metrics, the state's partition specs) on the first `devices` devices (a host state,
    laid out here), the parameters of at least `split_min_size` elements held split (None: none is)."""
    mesh = sharding.make_mesh(jax.devices()[:devices])
    placed, specs = _place(state, mesh, method, split_min_size)
    settings = method.settings(config, steps_per_epoch=STEPS_PER_EPOCH, total_steps=10 * STEPS_PER_EPOCH)
    axes = update_sharding.split_axes(state.params, mesh.size, split_min_size)
    dtype = jnp.dtype(config.model.dtype)
    step = make_train_step(method, model, tx, mesh, settings, specs, ssps, update_axes=axes, compute_dtype=dtype)
    after, metrics = step(placed, sharding.global_batch(batch, mesh), jax.random.PRNGKey(0))
    return jax.device_get(after), jax.device_get(metrics), specs


def max_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)), default=0.0)


def assert_8_devices_equal_1(method, config, batch, *, extra=None, loss_rtol=1e-6):
    """One plain step in float64 on 8 devices and on 1: the same loss, parameters, statistics and method state.

    SGD(1) makes the parameter change the averaged gradient. `extra(initial)`
    may edit the initial state (e.g. method state that starts at zero);
    `loss_rtol` allows for losses that scale the float32 encoder output up
    (AAM-softmax's scale 30, MoCo's temperature 0.03). Returns (initial state, {devices: (state, metrics)}).
    """
    config.model.dtype = "float64"
    with jax.enable_x64(True):
        model = method.build_model(config, bn_axis_name=sharding.DATA)
        tx = optax.sgd(1.0)
        initial = initial_state(method, config, model, tx, sharding.make_mesh(jax.devices()[:1]))
        if extra is not None:
            initial = extra(initial)
        batch = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in batch.items()}
        # On 8 devices the tiny model's kernels are held split, as the paper model's are (update_sharding.py),
        # and so is a momentum copy of them (a teacher): its EMA runs on each device's part.
        results = {d: step_on(method, config, model, tx, initial, batch, d, split_min_size=64) for d in (8, 1)}
    (a8, m8, specs8), (a1, m1, _) = results[8], results[1]
    assert _splits(specs8.params)
    if method.momentum_entry is not None:
        assert _splits(specs8.method_state[method.momentum_entry]["params"])
    # Float32-level agreement: the encoder rounds its pooling statistics and its output to float32 in
    # any compute dtype, so BatchNorm sums taken in another order can move a value by one float32 ulp.
    # A sharding error (a missing gather or pmean, a wrong slice) is O(1).
    assert float(m8["loss"]) == pytest.approx(float(m1["loss"]), rel=loss_rtol)
    grads = jax.tree.map(lambda b, a: b - a, initial.params, a1.params)
    scale = max(jax.tree.leaves(jax.tree.map(lambda g: float(np.max(np.abs(g))), grads)))
    assert scale > 0
    assert max_diff(a8.params, a1.params) < 1e-4 * scale
    assert max_diff(a8.batch_stats, a1.batch_stats) < 1e-6  # BatchNorm over the global batch
    if initial.method_state is not None:  # an EMA of the parameters, queued embeddings, ...
        magnitude = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(a1.method_state))
        assert max_diff(a8.method_state, a1.method_state) < 1e-4 * magnitude
    return initial, {d: (after, metrics) for d, (after, metrics, _) in results.items()}


def _splits(specs) -> bool:
    """Whether some leaf of a tree of partition specs is split over the data axis."""
    return any(sharding.DATA in spec for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))


COVERED = N // 2  # anchors 32 .. 32 + COVERED - 1 have a pseudo-positive in ssps_step_on_8_devices


def ssps_step_on_8_devices(method, config, batch, *, extra=None):
    """One SSPS step on 8 devices where the first COVERED anchors' only candidate is a known queue row.

    The other anchors have no candidate (their queue rows are emptied), so
    both the replaced and the kept positive branch are exercised; the caller
    checks the loss against a one-device reference. Returns (initial state,
    state after, metrics, the queue rows that replace (V, N, D), replace mask (N,)).
    """
    config.model.dtype = "float32"  # the queue writes index with Python ints, which x64 mode makes int64
    model = method.build_model(config, bn_axis_name=sharding.DATA)
    tx = optax.sgd(1.0)
    initial = initial_state(method, config, model, tx, sharding.make_mesh(jax.devices()[:1]))
    if extra is not None:
        initial = extra(initial)
    one = sharding.make_mesh(jax.devices()[:1])
    queues, rows = known_candidate_queues(
        one, method.positive_shape(config), config.model.encoder_dim, np.random.default_rng(5)
    )
    queues = jax.device_get(queues)
    pos_index = np.array(queues.pos_index)
    pos_index[0, COVERED:] = -1  # empty rows: anchors 32 + COVERED .. have no candidate
    initial = initial.replace(step=np.int32(STEPS_PER_EPOCH + 1), ssps=queues.replace(pos_index=pos_index))
    after, metrics, _ = step_on(method, config, model, tx, initial, batch, 8, SSPS_ONE_CANDIDATE)
    assert float(metrics["ssps/coverage"]) == COVERED / N
    # The batch's positive-branch embeddings went into block 1 (step 1 of the epoch), with their indices.
    np.testing.assert_array_equal(after.ssps.pos_index[1], batch["index"])
    mask = np.arange(N) < COVERED
    return initial, after, metrics, rows[:, 0], mask


def view_2_replaced(method, config, initial, batch, rows, mask):
    """The one-device reference of a siamese SSPS step (`ssps_step_on_8_devices`): the two views' outputs z1, z2
    of the initial variables in training mode, and z2 with the queue rows in place of the covered anchors'."""
    variables = {"params": initial.params, "batch_stats": initial.batch_stats}
    (z1, z2), _ = method.build_model(config).apply(variables, batch["views"], train=True, mutable=["batch_stats"])
    z1, z2 = np.asarray(z1), np.asarray(z2)
    return z1, z2, np.where(mask[:, None], rows[0], z2)


def records(workdir, kind):
    return [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


class Interrupted(Exception):
    pass


def ssps_run_config(config):
    """`config` with SSPS from epoch 1 (epoch 0 plain and filling the queues), 2 epochs of 15 steps."""
    config.ssps.enabled = True
    config.ssps.start_epoch = 1
    config.ssps.kmeans_clusters = 24
    config.ssps.pos_queue_size = 48
    config.train.epochs = 2
    return config


def assert_resume_in_ssps_epoch_reproduces(make_config, tmp_path):
    """A 2-epoch run (SSPS in epoch 1, if enabled) killed at its last step, its last checkpoint mid-epoch 1, then
    resumed: every step the resumed run trains again has the loss the killed run logged for it.

    The killed run is its own reference (its records of steps 18-29 are those of an uninterrupted run: the kill
    comes after them), so one run and its resumption check what an uninterrupted run and a resumed one would.
    Returns the train records of the whole run (each step once, as resumed).
    """
    steps_per_epoch = 240 // 16
    last = 2 * steps_per_epoch
    config = make_config()
    config.train.checkpoint_every_steps = steps_per_epoch + 2  # a checkpoint inside the SSPS epoch

    def kill(done, state):
        if done == last:  # before the epoch-end checkpoint: the resumption starts from step 17
            raise Interrupted

    workdir = tmp_path / "run"
    with pytest.raises(Interrupted):
        train_lib.train(config, workdir, on_step=kill)
    killed = {r["step"]: r["loss"] for r in records(workdir, "train")}
    assert sorted(killed) == list(range(1, last))  # the last step's metrics were not fetched
    train_lib.train(config, workdir)
    log = records(workdir, "train")
    again = {r["step"]: r["loss"] for r in log[len(killed) :]}
    assert sorted(again) == list(range(steps_per_epoch + 3, last + 1))
    np.testing.assert_allclose(
        [again[s] for s in range(steps_per_epoch + 3, last)],
        [killed[s] for s in range(steps_per_epoch + 3, last)],
        rtol=1e-6,
    )
    train = list({r["step"]: r for r in log}.values())
    if config.ssps.enabled:
        assert all(r["ssps/coverage"] > 0 for r in train if r["step"] > steps_per_epoch)
    return train
