"""NT-Xent against NumPy, on one device and across 8 devices; its additive margins against sslsv's formulas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from method_checks import N, siamese_batch, ssps_step_on_8_devices, tiny_method_config, view_2_replaced

from data_pipelines.errors import ConfigError
from ssps_jax import config as config_lib
from ssps_jax import sharding
from ssps_jax.methods import margins, simclr
from ssps_jax.methods.simclr import nt_xent


def _nt_xent_numpy(z1, z2, temperature):
    """SimCLR's loss over a batch of N pairs, written from its definition."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    sim = z @ z.T / temperature
    n = len(z1)
    losses = []
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        others = [k for k in range(2 * n) if k != i]
        losses.append(-sim[i, positive] + np.log(np.sum(np.exp(sim[i, others]))))
    return np.mean(losses)


@pytest.mark.parametrize("temperature", [0.03, 0.5])
def test_nt_xent_matches_numpy(temperature):
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(2, 12, 5)).astype(np.float32)
    z2 = z1 + 0.5 * z2  # positives are related
    got = float(nt_xent(z1, z2, temperature))
    assert got == pytest.approx(_nt_xent_numpy(z1, z2, temperature), rel=1e-5)


def test_nt_xent_with_negatives_from_all_devices():
    rng = np.random.default_rng(1)
    z1, z2 = rng.normal(size=(2, 32, 6)).astype(np.float32)  # 4 examples per device
    mesh = sharding.make_mesh()
    per_device = jax.shard_map(
        lambda a, b: jax.lax.pmean(nt_xent(a, b, 0.1, axis_name=sharding.DATA), sharding.DATA),
        mesh=mesh,
        in_specs=(P(sharding.DATA), P(sharding.DATA)),
        out_specs=P(),
        check_vma=False,
    )
    got = float(jax.jit(per_device)(z1, z2))
    assert got == pytest.approx(_nt_xent_numpy(z1, z2, 0.1), rel=1e-5)
    # Gradients taken per device (as the train step does) flow back through the gather:
    # device d's gradient is that of the sum of all devices' losses w.r.t. its own
    # embeddings, so divided by the device count it is its slice of the global gradient.
    local_grad = jax.shard_map(
        lambda a, b: jax.grad(nt_xent)(a, b, 0.1, axis_name=sharding.DATA) / mesh.size,
        mesh=mesh,
        in_specs=(P(sharding.DATA), P(sharding.DATA)),
        out_specs=P(sharding.DATA),
        check_vma=False,
    )
    expected = jax.grad(functools.partial(nt_xent, temperature=0.1))(z1, z2)
    np.testing.assert_allclose(jax.jit(local_grad)(z1, z2), expected, rtol=1e-4, atol=1e-6)


# --- SimCLR with additive margins (sslsv's SimCLRMargins) ------------------------------------------------------

MARGINS = dict(
    margin=0.2,
    scheduler=False,
    magface_l_margin=0.01,
    magface_u_margin=0.05,
    magface_l_a=0.5,
    magface_u_a=3.0,
    magface_lambda_g=0.35,
    adaface_h=0.333,
)


def _aam_numpy(cos, m):
    """cos(theta + m) while theta + m < pi, else cos - m sin(pi - m) (ArcFace; sslsv's _add_aam)."""
    theta = np.arccos(np.clip(cos, -1, 1))
    return np.cos(theta + m) if cos > np.cos(np.pi - m) else cos - np.sin(np.pi - m) * m


def _margins_numpy(z1, z2, loss, temperature, margin=0.2, stats=None, **kw):
    """sslsv's SimCLRMarginsLoss (symmetric) for one device, anchor by anchor: the positive's cosine with the
    loss's margin, the negatives' (SphereFace, CurricularFace) changed too, cross-entropy of the cosines / t.
    Returns (loss, the running statistics after the batch)."""
    m = {**MARGINS, "margin": margin, **kw}
    a = np.concatenate([z1, z2]).astype(np.float64)
    norms = np.linalg.norm(a, axis=1)
    z = a / norms[:, None]
    n2 = len(z)
    cos = z @ z.T
    positives = np.array([cos[i, (i + n2 // 2) % n2] for i in range(n2)])
    stats = dict(stats or {})
    if loss == "nt-xent-curricularface":
        stats["t"] = 0.01 * positives.mean() + 0.99 * stats["t"]
    if loss == "nt-xent-adaface":
        clipped = np.clip(norms, 0.001, 100)
        stats["norm_mean"] = 0.01 * clipped.mean() + 0.99 * stats["norm_mean"]
        stats["norm_std"] = 0.01 * clipped.std(ddof=1) + 0.99 * stats["norm_std"]
    losses, extra = [], 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        pos = cos[i, j]
        negs = np.array([cos[i, k] for k in range(n2) if k not in (i, j)])
        if loss == "nt-xent-cosface":
            pos = pos - margin
        elif loss == "nt-xent-arcface":
            pos = _aam_numpy(pos, margin)
        elif loss == "nt-xent-sphereface":

            def phi(x, mult):
                theta = mult * np.arccos(np.clip(x, -1 + 1e-5, 1 - 1e-5))
                k = np.floor(theta / np.pi)
                return (-1) ** k * np.cos(theta) - 2 * k

            pos, negs = phi(pos, margin), np.array([phi(x, 1.0) for x in negs])
        elif loss == "nt-xent-curricularface":
            with_margin = pos * np.cos(margin) - np.sqrt(max(0.0, 1 - pos**2)) * np.sin(margin)
            negs = np.array([x * (stats["t"] + x) if x > with_margin else x for x in negs])
            pos = with_margin if pos > np.cos(np.pi - margin) else pos - np.sin(np.pi - margin) * margin
        elif loss == "nt-xent-magface":
            a_i = np.clip(norms[i], m["magface_l_a"], m["magface_u_a"])
            slope = (m["magface_u_margin"] - m["magface_l_margin"]) / (m["magface_u_a"] - m["magface_l_a"])
            pos = _aam_numpy(pos, slope * (a_i - m["magface_l_a"]) + m["magface_l_margin"])
            extra += m["magface_lambda_g"] * (a_i / m["magface_u_a"] ** 2 + 1 / a_i) / n2
        elif loss == "nt-xent-adaface":
            a_i = np.clip(norms[i], 0.001, 100)
            s = np.clip((a_i - stats["norm_mean"]) / (stats["norm_std"] + 1e-3) * m["adaface_h"], -1, 1)
            theta = np.clip(np.arccos(pos) - margin * s, 1e-3, np.pi - 1e-3)
            pos = np.cos(theta) - (margin + margin * s)
        logits = np.concatenate([[pos], negs]) / temperature
        top = logits.max()
        losses.append(top + np.log(np.sum(np.exp(logits - top))) - logits[0])
    return np.mean(losses) + extra, stats


def _margins(loss, **kw):
    return margins.Margins(loss=loss, **{**MARGINS, **kw})


@pytest.mark.parametrize("loss", margins.LOSSES[1:])
def test_margin_losses_match_sslsvs_formulas(loss):
    rng = np.random.default_rng(2)
    z1 = rng.normal(size=(8, 5)).astype(np.float32) * 1.5
    z2 = z1 + 0.7 * rng.normal(size=(8, 5)).astype(np.float32)  # positives closer than negatives
    m = _margins(loss)
    initial = margins.INITIAL_STATS.get(loss)
    stats = margins.running_stats(m, z1, z2, initial, None)
    got = float(margins.margin_nt_xent(z1, z2, 0.1, m, 0.2, stats, None))
    want, want_stats = _margins_numpy(z1, z2, loss, 0.1, stats=initial)
    assert got == pytest.approx(want, rel=1e-5)
    for key, value in (stats or {}).items():
        assert float(value) == pytest.approx(want_stats[key], rel=1e-6)


def test_sphereface_has_the_gradient_of_the_plain_cosines():
    """sslsv adds phi(cos) - cos as a constant: the value is SphereFace's, the gradient that of a cross-entropy
    of the plain cosines shifted by those constants."""
    rng = np.random.default_rng(3)
    z1, z2 = rng.normal(size=(2, 6, 4)).astype(np.float32)
    n2 = 12
    rows = np.arange(n2)
    positive_at = (rows + n2 // 2) % n2
    z = np.concatenate([z1, z2]).astype(np.float64)
    cos = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ (z / np.linalg.norm(z, axis=1, keepdims=True)).T
    multiplier = np.ones((n2, n2))
    multiplier[rows, positive_at] = 0.2
    theta = multiplier * np.arccos(np.clip(cos, -1 + 1e-5, 1 - 1e-5))
    k = np.floor(theta / np.pi)
    shift = ((-1) ** k * np.cos(theta) - 2 * k - cos).astype(np.float32)  # held constant

    def shifted(a, b):
        u = jnp.concatenate([a, b])
        u = u / jnp.linalg.norm(u, axis=1, keepdims=True)
        logits = (u @ u.T + shift) / 0.1
        logits = logits.at[rows, rows].set(-jnp.inf)
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[rows, positive_at])

    def sphere(a, b):
        return margins.margin_nt_xent(a, b, 0.1, _margins("nt-xent-sphereface"), 0.2, None, None)

    assert float(sphere(z1, z2)) == pytest.approx(float(shifted(z1, z2)), rel=1e-5)
    for a, b in zip(jax.grad(sphere, argnums=(0, 1))(z1, z2), jax.grad(shifted, argnums=(0, 1))(z1, z2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_margin_scheduler_rises_by_a_half_cosine_over_the_first_half():
    m = _margins("nt-xent-cosface", margin=0.2, scheduler=True)
    got = [float(margins.scheduled_margin(m, jnp.int32(e), 10)) for e in range(8)]
    # sslsv: m - m (cos(pi e / 5) + 1) / 2 while e <= 5, then m.
    want = [0.2 - 0.2 * (np.cos(np.pi * e / 5) + 1) / 2 if e <= 5 else 0.2 for e in range(8)]
    np.testing.assert_allclose(got, want, atol=1e-7)
    assert margins.scheduled_margin(_margins("nt-xent-adaface", scheduler=True), jnp.int32(0), 10) == 0.2


@pytest.mark.parametrize("loss", ["nt-xent-adaface", "nt-xent-curricularface", "nt-xent-magface"])
def test_margin_losses_and_statistics_across_8_devices(loss):
    """Negatives gathered, statistics of the global batch: the loss of the whole batch, on 8 devices as on 1."""
    rng = np.random.default_rng(4)
    z1 = rng.normal(size=(16, 5)).astype(np.float32)
    z2 = z1 + 0.6 * rng.normal(size=(16, 5)).astype(np.float32)
    m = _margins(loss)
    initial = margins.INITIAL_STATS.get(loss)

    def per_device(a, b):
        stats = margins.running_stats(m, a, b, initial, sharding.DATA)
        value = margins.margin_nt_xent(a, b, 0.1, m, 0.2, stats, sharding.DATA)
        return jax.lax.pmean(value, sharding.DATA), stats

    mesh = sharding.make_mesh()
    sharded = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(sharding.DATA), P(sharding.DATA)), out_specs=P(), check_vma=False
    )
    got, stats = jax.jit(sharded)(z1, z2)
    want, want_stats = _margins_numpy(z1, z2, loss, 0.1, stats=initial)
    assert float(got) == pytest.approx(want, rel=1e-5)
    for key, value in (stats or {}).items():
        assert float(value) == pytest.approx(want_stats[key], rel=1e-5)


def test_simclr_ssps_step_with_adaface_margins_keeps_the_running_statistics(demo_dir):
    """Through the method: the margin loss with the pseudo-positives in place of view 2, the statistics after the
    batch in the method state, and the scheduler refused for a margin sslsv does not schedule."""
    config = tiny_method_config(demo_dir, "simclr")
    config.simclr.loss = "nt-xent-adaface"
    config.simclr.margin = 0.2
    batch = siamese_batch(np.random.default_rng(0), N, config)
    initial, after, metrics, rows, mask = ssps_step_on_8_devices(simclr.METHOD, config, batch)
    assert {k: float(v) for k, v in initial.method_state["margin_stats"].items()} == margins.INITIAL_STATS[
        "nt-xent-adaface"
    ]
    z1, _, used = view_2_replaced(simclr.METHOD, config, initial, batch, rows, mask)
    initial_stats = margins.INITIAL_STATS["nt-xent-adaface"]
    want, want_stats = _margins_numpy(z1, used, "nt-xent-adaface", 0.03, stats=initial_stats)
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-4)
    for key, value in after.method_state["margin_stats"].items():
        assert float(value) == pytest.approx(want_stats[key], rel=1e-4)
    config.simclr.margin_scheduler = True
    with pytest.raises(ConfigError, match=r"simclr\.margin_scheduler"):
        config_lib.validate(config, device_count=8)
