"""BYOL: the loss against NumPy, a step on 8 devices == on 1 with the target network's EMA by hand, SSPS
replacing both target projections, resume in the SSPS epoch."""

import jax
import numpy as np
import pytest
from method_checks import (
    STEPS_PER_EPOCH,
    N,
    assert_8_devices_equal_1,
    assert_resume_in_ssps_epoch_reproduces,
    siamese_batch,
    ssps_run_config,
    ssps_step_on_8_devices,
    tiny_method_config,
)

from ssps_jax.methods import byol

METHOD = byol.METHOD


def _byol_numpy(p1, p2, z1, z2):
    """sslsv's BYOL loss: 2 - 2 mean cos(p, z) for (p1, z2') plus the same for (p2, z1'), cosines by loops."""

    def term(p, z):
        cos = [a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(p.astype(np.float64), z)]
        return 2 - 2 * np.mean(cos)

    return term(p1, z2) + term(p2, z1)


def _small_config(demo_dir):
    config = tiny_method_config(demo_dir, "byol")
    config.byol.projector_hidden_dim = 32
    config.byol.projector_output_dim = 16
    config.byol.predictor_hidden_dim = 24
    return config


def _forward(config, variables, views, method):
    out, _ = METHOD.build_model(config).apply(variables, views, train=True, method=method, mutable=["batch_stats"])
    return [np.asarray(x) for x in out]


def test_byol_loss_matches_numpy():
    rng = np.random.default_rng(0)
    p1, p2, z1, z2 = rng.normal(size=(4, 10, 6)).astype(np.float32)
    z2 = p1 + 0.5 * z2  # related pairs: cosines well away from 0
    got = float(byol.byol_loss(p1, z2) + byol.byol_loss(p2, z1))
    assert got == pytest.approx(_byol_numpy(p1, p2, z1, z2), rel=1e-6)


def test_byol_step_on_8_devices_equals_1_and_moves_the_target_by_ema(demo_dir):
    config = _small_config(demo_dir)
    batch = siamese_batch(np.random.default_rng(0), N, config)
    # The loss is computed from float32 projections (the heads' output dtype): float32-level agreement.
    initial, results = assert_8_devices_equal_1(METHOD, config, batch, loss_rtol=1e-5)
    after, metrics = results[1]
    target = initial.method_state["target"]
    assert set(target["params"]) == {"encoder", "projector"}  # no predictor in the target network
    # The loss: online predictions against the target's projections (the same weights at step 0).
    with jax.enable_x64(True):
        views = batch["views"].astype(np.float64)
        online = {"params": initial.params, "batch_stats": initial.batch_stats}
        p1, p2 = _forward(config, online, views, None)
        z1, z2 = _forward(config, target, views, byol.BYOL.projections)
    assert float(metrics["loss"]) == pytest.approx(_byol_numpy(p1, p2, z1, z2), rel=1e-5)
    # tau on sslsv's half cosine: at step 0 it is start_tau.
    tau = 0.996
    assert float(metrics["tau"]) == pytest.approx(tau)
    old, new, moved = target["params"], after.params, after.method_state["target"]["params"]
    for path in (("encoder", "fc", "conv", "bias"), ("projector", "layers_6", "kernel")):
        o, n, m = old, new, moved
        for k in path:
            o, n, m = o[k], n[k], m[k]
        np.testing.assert_allclose(m, tau * o + (1 - tau) * n, rtol=1e-6)


def test_byol_ssps_replaces_both_target_projections_and_queues_the_originals(demo_dir):
    config = _small_config(demo_dir)
    batch = siamese_batch(np.random.default_rng(0), N, config)
    initial, after, metrics, rows, mask = ssps_step_on_8_devices(METHOD, config, batch)
    online = {"params": initial.params, "batch_stats": initial.batch_stats}
    p1, p2 = _forward(config, online, batch["views"], None)
    z = np.stack(_forward(config, initial.method_state["target"], batch["views"], byol.BYOL.projections))
    used = np.where(mask[None, :, None], rows, z)
    assert float(metrics["loss"]) == pytest.approx(_byol_numpy(p1, p2, used[0], used[1]), rel=1e-4)
    # The positive queue got the original target projections (block 1: step 1 of the epoch).
    np.testing.assert_allclose(after.ssps.pos_emb[:, 1], z, atol=1e-4)  # float32, BatchNorm over 16
    # The scheduled tau at this step: sslsv's half cosine over the 10 epochs of the step checks.
    step, total = STEPS_PER_EPOCH + 1, 10 * STEPS_PER_EPOCH
    want = 1 - (1 - 0.996) * (np.cos(np.pi * step / total) + 1) / 2
    assert float(metrics["tau"]) == pytest.approx(want, rel=1e-6)


def test_byol_ssps_resume_reproduces_the_losses(demo_dir, tmp_path):
    def make():
        return ssps_run_config(_small_config(demo_dir))

    train = assert_resume_in_ssps_epoch_reproduces(make, tmp_path)
    assert all(0 <= r["loss"] <= 8 for r in train)  # two terms of 2 - 2 cos, each in [0, 4]
