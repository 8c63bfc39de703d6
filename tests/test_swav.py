"""SwAV: Sinkhorn-Knopp and the swapped loss against NumPy (one device and 8), the frozen prototypes,
a step on 8 devices == on 1 with the feature queue in use, SSPS replacing view 2, resume."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from method_checks import (
    N,
    assert_8_devices_equal_1,
    assert_resume_in_ssps_epoch_reproduces,
    siamese_batch,
    ssps_run_config,
    ssps_step_on_8_devices,
    tiny_method_config,
    view_2_replaced,
)

from ssps_jax import sharding
from ssps_jax.methods import swav

METHOD = swav.METHOD


def _sinkhorn_numpy(scores, iterations, epsilon):
    """Sinkhorn-Knopp as SwAV defines it, on the (K, B) matrix: total mass 1, then alternately each
    prototype's row to 1 / K and each example's column to 1 / B; columns finally scaled to sum to 1."""
    q = np.exp(scores.astype(np.float64) / epsilon).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * b
    return (q * b).T


def _swapped_numpy(scores, codes, temperature):
    def log_softmax(x):
        x = x / temperature
        return x - x.max(axis=1, keepdims=True) - np.log(np.exp(x - x.max(axis=1, keepdims=True)).sum(1, keepdims=True))

    terms = [np.mean(-np.sum(codes[i] * log_softmax(scores[j]), axis=1)) for i in range(2) for j in range(2) if i != j]
    return np.mean(terms)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("iterations", [1, 3])
def test_sinkhorn_matches_numpy_and_partitions_equally(iterations):
    scores = np.tanh(np.random.default_rng(0).normal(size=(12, 5))).astype(np.float32)
    codes = np.asarray(swav.sinkhorn(scores, iterations, 0.05))
    np.testing.assert_allclose(codes, _sinkhorn_numpy(scores, iterations, 0.05), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(codes.sum(axis=1), 1.0, rtol=1e-5)  # each example's codes are a distribution
    # Run to convergence, the prototypes share the batch equally.
    converged = np.asarray(swav.sinkhorn(scores, 100, 0.5))
    np.testing.assert_allclose(converged.sum(axis=0), 12 / 5, rtol=1e-3)


def test_sinkhorn_over_8_devices_equals_one_device():
    scores = np.tanh(np.random.default_rng(1).normal(size=(32, 6))).astype(np.float32)
    per_device = jax.shard_map(
        lambda s: swav.sinkhorn(s, 3, 0.05, sharding.DATA),
        mesh=sharding.make_mesh(),
        in_specs=P(sharding.DATA),
        out_specs=P(sharding.DATA),
        check_vma=False,
    )
    np.testing.assert_allclose(jax.jit(per_device)(scores), _sinkhorn_numpy(scores, 3, 0.05), rtol=1e-4, atol=1e-7)


def test_swapped_loss_matches_numpy():
    rng = np.random.default_rng(2)
    scores = np.tanh(rng.normal(size=(2, 8, 5))).astype(np.float32)
    codes = np.stack([_sinkhorn_numpy(s, 3, 0.05) for s in scores]).astype(np.float32)
    got = float(swav.swapped_loss(scores, codes, 0.1))
    assert got == pytest.approx(_swapped_numpy(scores, codes, 0.1), rel=1e-5)


def _small_config(demo_dir):
    config = tiny_method_config(demo_dir, "swav")
    config.swav.projector_hidden_dim = 32
    config.swav.projector_output_dim = 24
    config.swav.prototypes = 20
    config.swav.queue_size = 2 * N  # 2 blocks
    config.swav.queue_start_epoch = 0  # the queue takes part from the first step
    return config


def test_prototypes_frozen_during_the_first_epoch(demo_dir):
    config = _small_config(demo_dir)
    tx, _ = METHOD.build_optimizer(config, steps_per_epoch=2, total_steps=8)
    params = {"prototypes": {"weight_v": np.ones((3, 2))}, "projector": {"layers_0": {"kernel": np.ones((2, 2))}}}
    grads = jax.tree.map(np.ones_like, params)
    state = tx.init(params)
    moved = []
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        moved.append(float(np.abs(updates["prototypes"]["weight_v"]).max()))
        assert float(np.abs(updates["projector"]["layers_0"]["kernel"]).max()) > 0
    assert moved[:2] == [0.0, 0.0] and moved[2] > 0  # epoch 0 (steps 0, 1): no update at all


def _random_queue(state):
    queue = _unit(np.random.default_rng(3).normal(size=state.method_state["queue"].shape)).astype(np.float32)
    return state.replace(method_state={"queue": queue})


def test_swav_step_with_its_queue_on_8_devices_equals_1(demo_dir):
    config = _small_config(demo_dir)
    batch = siamese_batch(np.random.default_rng(0), N, config)
    initial, results = assert_8_devices_equal_1(METHOD, config, batch, extra=_random_queue, loss_rtol=1e-5)
    after, _ = results[1]
    queue = initial.method_state["queue"]
    np.testing.assert_array_equal(after.method_state["queue"][:, 1], queue[:, 1])  # step 0 wrote block 0 only
    assert not np.allclose(after.method_state["queue"][:, 0], queue[:, 0])


def _reference_loss(config, variables, z1, z2, queue, use_queue):
    """The loss from one device's z1, z2 with NumPy's Sinkhorn over the batch (and the queue)."""
    model = METHOD.build_model(config)
    scores = [np.asarray(model.apply(variables, z, method=swav.SwAV.scores)) for z in (z1, z2)]
    flat = queue.reshape(2, -1, queue.shape[-1])
    codes = []
    for v in range(2):
        rows = scores[v]
        if use_queue:
            rows = np.concatenate([rows, np.asarray(model.apply(variables, flat[v], method=swav.SwAV.scores))])
        codes.append(_sinkhorn_numpy(rows, 3, 0.05)[: len(z1)])
    return _swapped_numpy(np.stack(scores), np.stack(codes), 0.1)


def test_swav_ssps_replaces_view_2_and_queues_the_originals(demo_dir):
    config = _small_config(demo_dir)
    batch = siamese_batch(np.random.default_rng(0), N, config)
    initial, after, metrics, rows, mask = ssps_step_on_8_devices(METHOD, config, batch, extra=_random_queue)
    z1, z2, used = view_2_replaced(METHOD, config, initial, batch, rows, mask)
    variables = {"params": initial.params, "batch_stats": initial.batch_stats}
    want = _reference_loss(config, variables, z1, used, initial.method_state["queue"], use_queue=True)
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-4)
    np.testing.assert_allclose(after.ssps.pos_emb[0, 1], z2, atol=1e-4)  # the original z2 ...
    block = int(initial.step) % 2
    np.testing.assert_allclose(after.method_state["queue"][1, block], z2, atol=1e-4)  # ... in both queues
    np.testing.assert_allclose(after.method_state["queue"][0, block], z1, atol=1e-4)


def test_swav_ssps_resume_reproduces_the_losses(demo_dir, tmp_path):
    def make():
        config = ssps_run_config(_small_config(demo_dir))
        config.swav.queue_start_epoch = 1
        return config

    train = assert_resume_in_ssps_epoch_reproduces(make, tmp_path)
    assert np.isfinite([r["loss"] for r in train]).all()
