"""Barlow Twins: the loss against NumPy (sslsv's formula) on one device and across 8, a step on 8 devices
== on 1, SSPS replacing view 2, resume in the SSPS epoch."""

import functools

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
from ssps_jax.methods import barlow_twins

METHOD = barlow_twins.METHOD


def _barlow_twins_numpy(z1, z2, lamda=0.005, scale=0.025):
    """sslsv's BarlowTwinsLoss on one device: each column standardised (biased variance, eps 1e-5), C = z1^T z2 / N,
    (C - I)^2 with the off-diagonal entries weighted by lamda, summed, times scale -- with loops over (i, j)."""
    z1, z2 = z1.astype(np.float64), z2.astype(np.float64)
    n, d = z1.shape
    a = (z1 - z1.mean(0)) / np.sqrt(z1.var(0) + 1e-5)
    b = (z2 - z2.mean(0)) / np.sqrt(z2.var(0) + 1e-5)
    total = 0.0
    for i in range(d):
        for j in range(d):
            c = np.sum(a[:, i] * b[:, j]) / n
            total += (c - 1) ** 2 if i == j else lamda * c**2
    return scale * total


def _small_config(demo_dir):
    config = tiny_method_config(demo_dir, "barlow_twins")
    config.barlow_twins.projector_hidden_dim = 32
    config.barlow_twins.projector_output_dim = 12
    return config


@pytest.mark.parametrize("lamda, scale", [(0.005, 0.025), (0.5, 1.0)])
def test_barlow_twins_loss_matches_numpy(lamda, scale):
    rng = np.random.default_rng(0)
    z1 = rng.normal(size=(16, 6)).astype(np.float32) * np.array([0.2, 0.5, 1, 2, 3, 0.1], np.float32)
    z2 = z1 + 0.3 * rng.normal(size=(16, 6)).astype(np.float32)
    got = float(barlow_twins.barlow_twins_loss(z1, z2, lamda, scale))
    assert got == pytest.approx(_barlow_twins_numpy(z1, z2, lamda, scale), rel=1e-5)


def test_barlow_twins_loss_and_gradient_across_8_devices():
    """Standardised and correlated over the global batch: on 8 devices the loss of the whole batch, and per-device
    gradients / devices are slices of the global gradient."""
    rng = np.random.default_rng(1)
    z1, z2 = rng.normal(size=(2, 32, 5)).astype(np.float32)  # 4 examples per device
    mesh = sharding.make_mesh()
    loss = functools.partial(barlow_twins.barlow_twins_loss, lamda=0.005, scale=0.025)
    specs = dict(mesh=mesh, in_specs=(P(sharding.DATA), P(sharding.DATA)), check_vma=False)
    per_device = jax.shard_map(
        lambda a, b: jax.lax.pmean(loss(a, b, axis_name=sharding.DATA), sharding.DATA), out_specs=P(), **specs
    )
    assert float(jax.jit(per_device)(z1, z2)) == pytest.approx(_barlow_twins_numpy(z1, z2), rel=1e-5)
    local_grad = jax.shard_map(
        lambda a, b: jax.grad(loss, argnums=(0, 1))(a, b, axis_name=sharding.DATA), out_specs=P(sharding.DATA), **specs
    )
    got = jax.jit(local_grad)(z1, z2)
    want = jax.grad(loss, argnums=(0, 1))(z1, z2)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g) / mesh.size, w, rtol=1e-4, atol=1e-7)


def test_barlow_twins_step_on_8_devices_equals_1(demo_dir):
    config = _small_config(demo_dir)
    # The loss standardises float32 projector outputs over 16 rows: float32-level agreement, amplified by the
    # division by each dimension's standard deviation (measured 9e-6 relative).
    batch = siamese_batch(np.random.default_rng(0), N, config)
    assert_8_devices_equal_1(METHOD, config, batch, loss_rtol=5e-5)


def test_barlow_twins_ssps_step_replaces_view_2_and_queues_the_original(demo_dir):
    config = _small_config(demo_dir)
    batch = siamese_batch(np.random.default_rng(0), N, config)
    initial, after, metrics, rows, mask = ssps_step_on_8_devices(METHOD, config, batch)
    z1, z2, used = view_2_replaced(METHOD, config, initial, batch, rows, mask)
    assert float(metrics["loss"]) == pytest.approx(_barlow_twins_numpy(z1, used), rel=1e-4)
    np.testing.assert_allclose(after.ssps.pos_emb[0, 1], z2, atol=1e-4)  # float32, BatchNorm over 16


def test_barlow_twins_ssps_resume_reproduces_the_losses(demo_dir, tmp_path):
    assert_resume_in_ssps_epoch_reproduces(lambda: ssps_run_config(_small_config(demo_dir)), tmp_path)
