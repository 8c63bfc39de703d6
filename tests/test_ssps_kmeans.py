"""k-means and the neighbour table (docs/method.md §4) against NumPy; sharded == unsharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from ssps_jax import sharding
from ssps_jax.ssps.clustering import make_cluster_fn, nmi
from ssps_jax.ssps.state import init_ssps_state


def _kmeans_numpy(x, init_rows, iterations):
    """docs/method.md §4, written plainly."""
    centroids = x[init_rows].astype(np.float64)
    for _ in range(iterations):
        labels = np.argmax(x @ centroids.T, axis=1)
        for k in range(len(centroids)):
            members = x[labels == k]
            if len(members):
                mean = members.mean(axis=0)
                centroids[k] = mean / np.linalg.norm(mean)
    return centroids, np.argmax(x @ centroids.T, axis=1)


def _planted(rng, clusters, per_cluster, dim, noise=0.3):
    centres = rng.normal(size=(clusters, dim))
    x = np.repeat(centres, per_cluster, axis=0) + noise * rng.normal(size=(clusters * per_cluster, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.repeat(np.arange(clusters), per_cluster)


def _state_with_queue(mesh, x, index, global_batch, clusters, neighbours, dataset_size):
    state = init_ssps_state(
        mesh,
        dataset_size=dataset_size,
        global_batch=global_batch,
        ref_capacity=len(x),
        pos_capacity=global_batch,
        ref_dim=x.shape[1],
        pos_dim=x.shape[1],
        views=1,
        clusters=clusters,
        neighbours=neighbours,
        dtype=jnp.float32,
        speaker=np.full(dataset_size, -1),
        session=np.full(dataset_size, -1),
    )
    blocks = len(x) // global_batch
    return state.replace(
        ref_emb=jax.device_put(x.reshape(blocks, global_batch, -1), state.ref_emb.sharding),
        ref_index=jax.device_put(index.reshape(blocks, global_batch).astype(np.int32), state.ref_index.sharding),
    )


@pytest.mark.parametrize("devices", [8, 1])
def test_kmeans_equals_numpy_from_the_same_init(devices):
    rng = np.random.default_rng(0)
    x, _ = _planted(rng, clusters=12, per_cluster=40, dim=16, noise=0.8)  # overlapping: iterations matter
    index = rng.permutation(2000)[: len(x)]  # dataset indices of the queue rows
    mesh = sharding.make_mesh(jax.devices()[:devices])
    state = _state_with_queue(mesh, x, index, global_batch=32, clusters=12, neighbours=2, dataset_size=2000)
    key = jax.random.PRNGKey(3)
    out = jax.device_get(make_cluster_fn(mesh, iterations=10, neighbours=2)(state, key, jnp.int32(4)))
    init_rows = np.asarray(jax.random.permutation(key, len(x))[:12])
    centroids, labels = _kmeans_numpy(x.astype(np.float64), init_rows, 10)
    np.testing.assert_allclose(out.centroids, centroids, atol=1e-5)
    expected = np.full(2000, -1)
    expected[index] = labels
    np.testing.assert_array_equal(out.assignment, expected)  # absent indices: -1
    assert int(out.clustered_epoch) == 4
    # Neighbours: the 2 most similar *other* centroids, nearest first.
    sims = centroids @ centroids.T
    np.fill_diagonal(sims, -np.inf)
    np.testing.assert_array_equal(out.neighbours, np.argsort(-sims, axis=1)[:, :2])


def test_sharded_clustering_equals_one_device():
    rng = np.random.default_rng(1)
    x, _ = _planted(rng, clusters=20, per_cluster=32, dim=24, noise=1.0)
    index = rng.permutation(len(x))
    results = []
    for devices in (8, 1):
        mesh = sharding.make_mesh(jax.devices()[:devices])
        state = _state_with_queue(mesh, x, index, global_batch=64, clusters=20, neighbours=3, dataset_size=len(x))
        results.append(jax.device_get(make_cluster_fn(mesh, 10, 3)(state, jax.random.PRNGKey(0), jnp.int32(0))))
    np.testing.assert_allclose(results[0].centroids, results[1].centroids, atol=1e-5)
    np.testing.assert_array_equal(results[0].assignment, results[1].assignment)
    np.testing.assert_array_equal(results[0].neighbours, results[1].neighbours)


def test_planted_clusters_are_found_and_their_neighbours_are_right():
    rng = np.random.default_rng(2)
    # Pairs of nearby centres (2p, 2p + 1): each cluster's nearest other centroid is its twin.
    base = rng.normal(size=(6, 32))
    centres = np.repeat(base, 2, axis=0) + 0.3 * rng.normal(size=(12, 32))
    x = np.repeat(centres, 24, axis=0) + 0.02 * rng.normal(size=(12 * 24, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    truth = np.repeat(np.arange(12), 24)
    # Plant the init too: the queue positions the seeded init picks hold one row of each cluster.
    key = jax.random.PRNGKey(0)
    chosen = np.asarray(jax.random.permutation(key, len(x))[:12])
    rows = np.full(len(x), -1)
    rows[chosen] = np.arange(12) * 24  # the first row of each planted cluster
    rest = np.setdiff1d(np.arange(len(x)), rows[chosen])
    rows[rows < 0] = rng.permutation(rest)
    mesh = sharding.make_mesh()
    state = _state_with_queue(mesh, x[rows], rows, 32, clusters=12, neighbours=1, dataset_size=len(x))
    out = jax.device_get(make_cluster_fn(mesh, 10, 1)(state, key, jnp.int32(0)))
    np.testing.assert_array_equal(out.assignment, truth)  # cluster k is planted cluster k (its init row)
    np.testing.assert_array_equal(out.neighbours[:, 0], np.arange(12) ^ 1)  # each one's twin


def test_zero_neighbours_means_the_cluster_itself():
    x, _ = _planted(np.random.default_rng(3), clusters=4, per_cluster=16, dim=8)
    mesh = sharding.make_mesh()
    state = _state_with_queue(mesh, x, np.arange(len(x)), 16, clusters=4, neighbours=0, dataset_size=len(x))
    out = jax.device_get(make_cluster_fn(mesh, 5, 0)(state, jax.random.PRNGKey(0), jnp.int32(0)))
    np.testing.assert_array_equal(out.neighbours[:, 0], np.arange(4))


@pytest.mark.parametrize("seed", range(3))
def test_nmi_matches_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 7, 500), rng.integers(0, 11, 500)
    b[:250] = a[:250]
    assert nmi(a, b) == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-10)
    assert nmi(a, a) == pytest.approx(1.0)
