"""VICReg: the loss against NumPy and across 8 devices, a step on 8 devices == on 1, SSPS in its step, resume."""

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
from ssps_jax.methods import vicreg

METHOD = vicreg.METHOD


def _vicreg_numpy(z1, z2, inv=1.0, var=1.0, cov=0.04):
    """VICReg from its definition, with loops over dimensions and pairs of dimensions."""
    z1, z2 = z1.astype(np.float64), z2.astype(np.float64)
    d = z1.shape[1]
    invariance = np.mean((z1 - z2) ** 2)
    variance = covariance = 0.0
    for z in (z1, z2):
        variance += np.mean([max(0.0, 1 - np.sqrt(np.var(z[:, k], ddof=1) + 1e-4)) for k in range(d)])
        c = np.cov(z, rowvar=False)  # unbiased
        covariance += sum(c[a, b] ** 2 for a in range(d) for b in range(d) if a != b) / d
    return inv * invariance + var * variance + cov * covariance


def _small_config(demo_dir):
    config = tiny_method_config(demo_dir, "vicreg")
    config.vicreg.projector_hidden_dim = 32
    config.vicreg.projector_output_dim = 24
    return config


@pytest.mark.parametrize("weights", [(1.0, 1.0, 0.04), (0.5, 2.0, 1.0)])
def test_vicreg_loss_matches_numpy(weights):
    rng = np.random.default_rng(0)
    z1 = rng.normal(size=(12, 6)).astype(np.float32) * np.array([0.2, 0.5, 1, 2, 3, 0.1], np.float32)
    z2 = z1 + 0.3 * rng.normal(size=(12, 6)).astype(np.float32)  # some dimensions under the variance hinge
    got = float(vicreg.vicreg_loss(z1, z2, *weights))
    assert got == pytest.approx(_vicreg_numpy(z1, z2, *weights), rel=1e-5)


def test_vicreg_loss_and_gradient_across_8_devices():
    rng = np.random.default_rng(1)
    z1, z2 = rng.normal(size=(2, 32, 5)).astype(np.float32)  # 4 examples per device
    mesh = sharding.make_mesh()
    loss = functools.partial(vicreg.vicreg_loss, inv_weight=1.0, var_weight=1.0, cov_weight=0.04)
    per_device = jax.shard_map(
        lambda a, b: jax.lax.pmean(loss(a, b, axis_name=sharding.DATA), sharding.DATA),
        mesh=mesh,
        in_specs=(P(sharding.DATA), P(sharding.DATA)),
        out_specs=P(),
        check_vma=False,
    )
    assert float(jax.jit(per_device)(z1, z2)) == pytest.approx(_vicreg_numpy(z1, z2), rel=1e-5)
    # Per-device gradients (through the gathers) / devices == slices of the global gradient.
    local_grad = jax.shard_map(
        lambda a, b: jax.grad(loss, argnums=(0, 1))(a, b, axis_name=sharding.DATA),
        mesh=mesh,
        in_specs=(P(sharding.DATA), P(sharding.DATA)),
        out_specs=P(sharding.DATA),
        check_vma=False,
    )
    got = jax.jit(local_grad)(z1, z2)
    want = jax.grad(loss, argnums=(0, 1))(z1, z2)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g) / mesh.size, w, rtol=1e-4, atol=1e-7)


def test_vicreg_step_on_8_devices_equals_1(demo_dir):
    config = _small_config(demo_dir)
    assert_8_devices_equal_1(METHOD, config, siamese_batch(np.random.default_rng(0), N, config))


def test_vicreg_ssps_step_replaces_view_2_and_queues_the_original(demo_dir):
    """On 8 devices, against a one-device reference: the loss is VICReg's with the queue rows in place of z2
    for the covered anchors, and the original z2 is what the positive queue receives."""
    config = _small_config(demo_dir)
    batch = siamese_batch(np.random.default_rng(0), N, config)
    initial, after, metrics, rows, mask = ssps_step_on_8_devices(METHOD, config, batch)
    z1, z2, used = view_2_replaced(METHOD, config, initial, batch, rows, mask)
    assert float(metrics["loss"]) == pytest.approx(_vicreg_numpy(z1, used), rel=1e-5)
    np.testing.assert_allclose(after.ssps.pos_emb[0, 1], z2, atol=1e-4)  # float32, BatchNorm over 16


def test_vicreg_ssps_resume_reproduces_the_losses(demo_dir, tmp_path):
    assert_resume_in_ssps_epoch_reproduces(lambda: ssps_run_config(_small_config(demo_dir)), tmp_path)
