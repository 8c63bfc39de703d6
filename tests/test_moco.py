"""MoCo: the loss against NumPy with the queue sharded like the SSPS queues, a step on 8 devices == on 1
(queue write, momentum EMA), SSPS replacing both keys, resume through an SSPS epoch."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from method_checks import (
    COVERED,
    STEPS_PER_EPOCH,
    N,
    assert_8_devices_equal_1,
    assert_resume_in_ssps_epoch_reproduces,
    siamese_batch,
    ssps_run_config,
    ssps_step_on_8_devices,
    tiny_method_config,
)

from ssps_jax import sharding
from ssps_jax.methods import moco

METHOD = moco.METHOD


def _unit(x):
    x = np.asarray(x)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _moco_numpy(query, key, negatives, temperature):
    """InfoNCE from its definition: -log(exp(q.k / t) / (exp(q.k / t) + sum_neg exp(q.neg / t)))."""
    query, key, negatives = (x.astype(np.float64) for x in (query, key, negatives))
    losses = []
    for q, k in zip(query, key):
        pos = np.exp(q @ k / temperature)
        losses.append(-np.log(pos / (pos + np.sum(np.exp(negatives @ q / temperature)))))
    return np.mean(losses)


def _small_config(demo_dir):
    config = tiny_method_config(demo_dir, "moco")
    config.moco.projector = False  # the SSPS experiments' MoCo
    config.moco.temperature = 0.03
    config.moco.queue_size = 3 * N  # 3 blocks
    return config


@pytest.mark.parametrize("temperature", [0.03, 0.2])
def test_moco_loss_matches_numpy(temperature):
    rng = np.random.default_rng(0)
    q = _unit(rng.normal(size=(6, 5))).astype(np.float32)
    k = _unit(q + 0.5 * rng.normal(size=(6, 5))).astype(np.float32)
    queue = _unit(rng.normal(size=(3, 4, 5))).astype(np.float32)  # (blocks, rows, D)
    got = float(moco.moco_loss(q, k, queue, temperature))
    assert got == pytest.approx(_moco_numpy(q, k, queue.reshape(-1, 5), temperature), rel=1e-5)


def test_moco_loss_with_the_queue_split_over_8_devices():
    """Each device holds its rows of every queue block: the loss and its gradient are those of the whole queue."""
    rng = np.random.default_rng(1)
    q = _unit(rng.normal(size=(32, 6))).astype(np.float32)  # 4 queries per device
    k = _unit(rng.normal(size=(32, 6))).astype(np.float32)
    queue = _unit(rng.normal(size=(3, 32, 6))).astype(np.float32)  # 3 blocks of 32 rows
    mesh = sharding.make_mesh()
    loss = functools.partial(moco.moco_loss, temperature=0.1, axis_name=sharding.DATA)
    specs = (P(sharding.DATA), P(sharding.DATA), P(None, sharding.DATA))
    per_device = jax.shard_map(
        lambda a, b, c: jax.lax.pmean(loss(a, b, c), sharding.DATA),
        mesh=mesh,
        in_specs=specs,
        out_specs=P(),
        check_vma=False,
    )
    want = _moco_numpy(q, k, queue.reshape(-1, 6), 0.1)
    assert float(jax.jit(per_device)(q, k, queue)) == pytest.approx(want, rel=1e-5)
    local_grad = jax.shard_map(
        lambda a, b, c: jax.grad(loss)(a, b, c) / mesh.size,
        mesh=mesh,
        in_specs=specs,
        out_specs=P(sharding.DATA),
        check_vma=False,
    )
    expected = jax.grad(functools.partial(moco.moco_loss, temperature=0.1))(q, k, queue)
    np.testing.assert_allclose(jax.jit(local_grad)(q, k, queue), expected, rtol=1e-4, atol=1e-6)


def _keys(config, variables, views):
    (k1, k2), _ = METHOD.build_model(config).apply(variables, views, train=True, mutable=["batch_stats"])
    return np.stack([_unit(np.asarray(k1)), _unit(np.asarray(k2))])


def test_moco_step_on_8_devices_equals_1_writes_the_keys_and_moves_the_key_network(demo_dir):
    config = _small_config(demo_dir)
    batch = siamese_batch(np.random.default_rng(0), N, config)
    initial, results = assert_8_devices_equal_1(METHOD, config, batch, loss_rtol=1e-5)  # logits / 0.03
    after, metrics = results[1]
    momentum = initial.method_state["momentum"]
    with jax.enable_x64(True):
        keys = _keys(config, momentum, batch["views"].astype(np.float64))
    # Step 0 writes block 0; the other blocks keep their random unit rows.
    queue = initial.method_state["queue"]
    np.testing.assert_allclose(after.method_state["queue"][:, 0], keys, atol=1e-4)  # float32 encoder output
    np.testing.assert_array_equal(after.method_state["queue"][:, 1:], queue[:, 1:])
    # The loss used the queue as it was before the write.
    with jax.enable_x64(True):
        (q1, q2), _ = METHOD.build_model(config).apply(
            {"params": initial.params, "batch_stats": initial.batch_stats},
            batch["views"].astype(np.float64),
            train=True,
            mutable=["batch_stats"],
        )
    flat = queue.reshape(2, -1, queue.shape[-1])
    want = (_moco_numpy(_unit(q1), keys[1], flat[1], 0.03) + _moco_numpy(_unit(q2), keys[0], flat[0], 0.03)) / 2
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5)
    # tau constant at 0.999 (no scheduler): the key network moved 0.1% of the way to the new query network.
    path = ("encoder", "fc", "conv", "bias")
    new, old = after.params, momentum["params"]
    for k in path:
        new, old = new[k], old[k]
    moved = after.method_state["momentum"]["params"]
    for k in path:
        moved = moved[k]
    np.testing.assert_allclose(moved, 0.999 * old + 0.001 * new, rtol=1e-6)
    assert float(metrics["tau"]) == pytest.approx(0.999)


def test_moco_ssps_replaces_both_keys_queues_the_originals_and_enqueues_the_replaced(demo_dir):
    config = _small_config(demo_dir)
    batch = siamese_batch(np.random.default_rng(0), N, config)
    initial, after, metrics, rows, mask = ssps_step_on_8_devices(METHOD, config, batch)
    keys = _keys(config, initial.method_state["momentum"], batch["views"])
    used = np.where(mask[None, :, None], rows, keys)
    (q1, q2), _ = METHOD.build_model(config).apply(
        {"params": initial.params, "batch_stats": initial.batch_stats},
        batch["views"],
        train=True,
        mutable=["batch_stats"],
    )
    queue = initial.method_state["queue"]
    flat = queue.reshape(2, -1, queue.shape[-1])
    want = (_moco_numpy(_unit(q1), used[1], flat[1], 0.03) + _moco_numpy(_unit(q2), used[0], flat[0], 0.03)) / 2
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-4)
    # The SSPS positive queue got the original keys (block 1: step 1 of the epoch) ...
    np.testing.assert_allclose(after.ssps.pos_emb[:, 1], keys, atol=1e-4)
    # ... and the negative queue the keys the loss used, at block (step mod 3).
    block = (STEPS_PER_EPOCH + 1) % 3
    np.testing.assert_allclose(after.method_state["queue"][:, block, :COVERED], rows[:, :COVERED], atol=1e-6)
    np.testing.assert_allclose(after.method_state["queue"][:, block, COVERED:], keys[:, COVERED:], atol=1e-4)


def test_moco_ssps_resume_reproduces_the_losses_and_the_queue(demo_dir, tmp_path):
    def make():
        return ssps_run_config(_small_config(demo_dir))

    train = assert_resume_in_ssps_epoch_reproduces(make, tmp_path)
    assert all(r["tau"] == pytest.approx(0.999) for r in train)
