"""NT-Xent against NumPy, on one device and across 8 devices."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ssps_jax import sharding
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
