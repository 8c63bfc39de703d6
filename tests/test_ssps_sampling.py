"""Pseudo-positive sampling (docs/method.md §5) on 8 devices, with hand-built queues."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from scipy import stats

from ssps_jax import sharding
from ssps_jax.ssps import sampling
from ssps_jax.ssps.state import init_ssps_state, partition_specs

G = 16  # global batch: 2 anchors per device
CAPACITY = 64  # positive queue: 4 blocks of 16 rows, 8 rows per device
N = 200  # dataset size
DIM = 4


def _state(mesh, pos_index, assignment=None, neighbours=None, ref_emb=None, clusters=10):
    """An SSPS state with the given positive queue (and aligned reference queue)."""
    state = init_ssps_state(
        mesh,
        dataset_size=N,
        global_batch=G,
        ref_capacity=CAPACITY,
        pos_capacity=CAPACITY,
        ref_dim=DIM,
        pos_dim=DIM,
        views=1,
        clusters=clusters,
        neighbours=1 if neighbours is None else neighbours.shape[1],
        dtype=jnp.float32,
        speaker=np.full(N, -1),
        session=np.full(N, -1),
    )
    # Row r of the queue carries the embedding (r, r, r, r): the chosen row can be read off it.
    emb = np.repeat(np.arange(CAPACITY, dtype=np.float32)[:, None], DIM, axis=1)
    fields = {
        "pos_index": np.asarray(pos_index, np.int32).reshape(-1, G),
        "pos_emb": emb.reshape(1, -1, G, DIM),
        "ref_index": np.asarray(pos_index, np.int32).reshape(-1, G),
        "ref_emb": (emb if ref_emb is None else ref_emb).reshape(-1, G, DIM),
    }
    if assignment is not None:
        fields["assignment"] = np.asarray(assignment, np.int32)
    if neighbours is not None:
        fields["neighbours"] = np.asarray(neighbours, np.int32)
    return state.replace(**{k: jax.device_put(v, getattr(state, k).sharding) for k, v in fields.items()})


def _sampler(mesh, cfg):
    """jit(shard_map(sample)) -> (chosen queue row or -1, dataset index, mask) for the global batch."""

    def run(state, anchors, y_ref, key):
        s = sampling.sample(state, anchors, y_ref, key, cfg, sharding.DATA)
        row = jnp.where(s.mask, s.embeddings[0, :, 0], -1).astype(jnp.int32)
        return row, s.index, s.mask

    return jax.jit(
        jax.shard_map(
            run,
            mesh=mesh,
            in_specs=(partition_specs(), P(sharding.DATA), P(sharding.DATA), P()),
            out_specs=P(sharding.DATA),
            check_vma=False,
        )
    )


@functools.cache
def _mesh():
    return sharding.make_mesh()


def _kmeans_setup(rng):
    """10 clusters; each dataset index i is in cluster i % 10; queue rows hold random indices."""
    assignment = np.arange(N) % 10
    pos_index = rng.choice(N, CAPACITY, replace=False)
    neighbours = ((np.arange(10) + 3) % 10)[:, None]  # c* = c + 3 (mod 10)
    return assignment, pos_index, neighbours


def test_kmeans_repr_only_returns_rows_of_the_chosen_cluster():
    rng = np.random.default_rng(0)
    assignment, pos_index, neighbours = _kmeans_setup(rng)
    state = _state(_mesh(), pos_index, assignment, neighbours)
    run = _sampler(_mesh(), sampling.SamplingConfig("kmeans-repr", inter_size=1))
    anchors = rng.choice(N, G, replace=False).astype(np.int32)
    y = np.zeros((G, DIM), np.float32)
    for seed in range(20):
        row, index, mask = map(np.asarray, run(state, anchors, y, jax.random.PRNGKey(seed)))
        target = (assignment[anchors] + 3) % 10
        has_candidates = np.array([np.any(assignment[pos_index] == t) for t in target])
        np.testing.assert_array_equal(mask, has_candidates)
        assert np.all(assignment[pos_index[row[mask]]] == target[mask])
        np.testing.assert_array_equal(index[mask], pos_index[row[mask]])  # the row's dataset index
        assert np.all(index[~mask] == -1)


def test_kmeans_repr_is_uniform_over_matching_rows_of_all_shards():
    rng = np.random.default_rng(1)
    assignment = np.zeros(N, np.int32)
    assignment[100:] = 1
    # Cluster 1 has 13 rows spread over the 8 shards (queue rows live on device (row % 16) // 2).
    rows_of_1 = rng.choice(CAPACITY, 13, replace=False)
    pos_index = rng.choice(100, CAPACITY, replace=False)
    pos_index[rows_of_1] = 100 + np.arange(13)
    assert len({(r % G) // 2 for r in rows_of_1}) >= 5  # really spread over devices
    neighbours = np.array([[1], [1]])  # every anchor draws in cluster 1
    state = _state(_mesh(), pos_index, assignment, neighbours, clusters=2)
    run = _sampler(_mesh(), sampling.SamplingConfig("kmeans-repr", inter_size=1))
    anchors = np.arange(G, dtype=np.int32)
    y = np.zeros((G, DIM), np.float32)
    draws = np.concatenate([np.asarray(run(state, anchors, y, jax.random.PRNGKey(s))[0]) for s in range(300)])
    assert set(draws) == set(rows_of_1)
    counts = np.array([np.sum(draws == r) for r in rows_of_1])
    assert stats.chisquare(counts).pvalue > 1e-3  # 4800 draws over 13 rows: uniform


def test_m0_on_a_corpus_whose_clusters_are_speakers_gives_same_speaker_positives():
    rng = np.random.default_rng(2)
    speaker = rng.integers(0, 10, N)
    pos_index = rng.choice(N, CAPACITY, replace=False)
    state = _state(_mesh(), pos_index, assignment=speaker, neighbours=np.arange(10)[:, None])
    run = _sampler(_mesh(), sampling.SamplingConfig("kmeans-repr", inter_size=0))
    anchors = rng.choice(N, G, replace=False).astype(np.int32)
    _, index, mask = map(np.asarray, run(state, anchors, np.zeros((G, DIM), np.float32), jax.random.PRNGKey(0)))
    assert mask.sum() >= G - 2
    np.testing.assert_array_equal(speaker[index[mask]], speaker[anchors[mask]])


def test_anchors_without_cluster_or_candidates_keep_their_positive():
    assignment = np.full(N, -1)
    assignment[:50] = 0  # cluster 0: indices 0..49
    assignment[50:60] = 1  # cluster 1: indices 50..59, none of them in the queue
    pos_index = np.concatenate([np.arange(40), np.full(CAPACITY - 40, -1)])  # partly empty queue
    state = _state(_mesh(), pos_index, assignment, neighbours=np.array([[0], [1]]), clusters=2)
    run = _sampler(_mesh(), sampling.SamplingConfig("kmeans-repr", inter_size=0))
    anchors = np.array([1, 2, 55, 56, 150, 151, *range(3, 13)], np.int32)
    row, _, mask = map(np.asarray, run(state, anchors, np.zeros((G, DIM), np.float32), jax.random.PRNGKey(0)))
    np.testing.assert_array_equal(mask, [True, True, False, False, False, False] + [True] * 10)
    assert np.all(row[mask] < 40)  # never an empty row


def test_centroid_variant_returns_the_centroid_of_the_drawn_cluster():
    rng = np.random.default_rng(4)
    assignment, pos_index, neighbours = _kmeans_setup(rng)
    state = _state(_mesh(), pos_index, assignment, neighbours)
    centroids = rng.normal(size=(10, DIM)).astype(np.float32)
    state = state.replace(centroids=jax.device_put(centroids, state.centroids.sharding))
    cfg = sampling.SamplingConfig("kmeans", inter_size=1)

    def run(state, anchors, key):
        s = sampling.sample(state, anchors, None, key, cfg, sharding.DATA)
        return s.embeddings[0], s.mask

    run = jax.jit(
        jax.shard_map(
            run,
            mesh=_mesh(),
            in_specs=(partition_specs(), P(sharding.DATA), P()),
            out_specs=P(sharding.DATA),
            check_vma=False,
        )
    )
    anchors = np.arange(G, dtype=np.int32)
    emb, mask = map(np.asarray, run(state, anchors, jax.random.PRNGKey(0)))
    assert mask.all()
    np.testing.assert_allclose(emb, centroids[(assignment[anchors] + 3) % 10])


def test_inter_sampling_exponential_weights_over_neighbour_rank():
    # Cluster 0's neighbours by rank: clusters 1, 2, 3; each has its own queue rows.
    assignment = np.concatenate([np.zeros(50), np.ones(50), np.full(50, 2), np.full(50, 3)]).astype(np.int32)
    pos_index = np.concatenate([np.arange(50, 200, 3)[:CAPACITY], np.full(CAPACITY, -1)])[:CAPACITY]
    state = _state(_mesh(), pos_index, assignment, np.array([[1, 2, 3]] * 4), clusters=4)
    cfg = sampling.SamplingConfig("kmeans-repr", inter_size=3, inter_exp=True, inter_lambda=0.7)
    run = _sampler(_mesh(), cfg)
    anchors = np.arange(G, dtype=np.int32)  # all in cluster 0
    picked = np.concatenate(
        [np.asarray(run(state, anchors, np.zeros((G, DIM), np.float32), jax.random.PRNGKey(s))[1]) for s in range(200)]
    )
    observed = np.bincount(assignment[picked], minlength=4)[1:]
    weights = np.exp(-0.7 * np.arange(3))
    assert stats.chisquare(observed, weights / weights.sum() * len(picked)).pvalue > 1e-3


@pytest.mark.parametrize("top", [1, 5])
def test_knn_never_returns_the_anchor_itself_and_picks_among_the_top_m(top):
    rng = np.random.default_rng(5)
    pos_index = rng.choice(N, CAPACITY, replace=False)
    ref = rng.normal(size=(CAPACITY, DIM)).astype(np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    state = _state(_mesh(), pos_index, ref_emb=ref)
    run = _sampler(_mesh(), sampling.SamplingConfig("knn", intra_size=top))
    # Anchors are queue entries themselves, with y^ equal to their own queue row: the most
    # similar row is always their own, which must be excluded.
    rows = rng.choice(CAPACITY, G, replace=False)
    anchors, y = pos_index[rows].astype(np.int32), ref[rows]
    seen = set()
    for seed in range(30):
        row, index, mask = map(np.asarray, run(state, anchors, y, jax.random.PRNGKey(seed)))
        assert mask.all()
        assert np.all(index != anchors)
        sims = y @ ref.T
        sims[np.arange(G), rows] = -np.inf
        best = np.argsort(-sims, axis=1)[:, :top]
        assert all(r in b for r, b in zip(row, best))
        seen.update(zip(range(G), row))
    assert len(seen) == G * top  # every one of the top-M gets drawn


def test_queues_are_split_not_replicated():
    """Each device holds 1/8 of every queue row (memory per device = total / devices), in bf16 if asked."""
    mesh = _mesh()
    state = init_ssps_state(
        mesh,
        dataset_size=N,
        global_batch=G,
        ref_capacity=4 * G,
        pos_capacity=2 * G,
        ref_dim=DIM,
        pos_dim=6,
        views=2,
        clusters=3,
        neighbours=1,
        dtype=jnp.bfloat16,
        speaker=np.full(N, -1),
        session=np.full(N, -1),
    )
    for queue in (state.ref_index, state.ref_emb, state.pos_index, state.pos_emb):
        shards = queue.addressable_shards
        assert len(shards) == 8
        assert all(s.data.nbytes * 8 == queue.nbytes for s in shards)
        assert len({str(s.index) for s in shards}) == 8  # eight different slices, not copies
    assert state.ref_emb.dtype == state.pos_emb.dtype == jnp.bfloat16


def test_cluster_size_cv_against_a_hand_computed_case():
    from ssps_jax.ssps.lifecycle import cluster_size_cv

    # K = 4, sizes (3, 1, 0, 0) from 4 assigned indices and 2 unassigned: mean 1, std sqrt(1.5).
    assignment = np.array([0, 0, 1, -1, 0, -1])
    assert cluster_size_cv(assignment, 4) == pytest.approx(np.sqrt(1.5))
    assert cluster_size_cv(np.array([2, 1, 0]), 3) == 0.0  # equal sizes
    assert np.isnan(cluster_size_cv(np.full(3, -1), 3))


def test_label_free_cluster_cosines_average_over_anchors_with_both_clusters():
    """ssps/own_cluster_cos and ssps/pseudo_cluster_cos on 8 devices == the NumPy means over eligible anchors."""
    from ssps_jax.ssps import step as ssps_step

    rng = np.random.default_rng(3)
    assignment = rng.integers(-1, 10, N).astype(np.int32)  # some indices unassigned
    state = _state(_mesh(), rng.integers(0, N, CAPACITY), assignment)
    centroids = rng.normal(size=(10, DIM)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    state = state.replace(centroids=jax.device_put(centroids, state.centroids.sharding))
    anchors = rng.choice(N, G, replace=False).astype(np.int32)
    y = rng.normal(size=(G, DIM)).astype(np.float32)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    chosen = rng.integers(-1, N, G).astype(np.int32)  # -1: no pseudo-positive (or a centroid)
    mask = rng.random(G) < 0.8

    def run(state, anchors, y, chosen, mask):
        sample = sampling.Sample(jnp.zeros((1, anchors.shape[0], DIM)), mask, chosen)
        return ssps_step._metrics(state, anchors, y, sample, mask, sharding.DATA)

    metrics = jax.jit(
        jax.shard_map(
            run,
            mesh=_mesh(),
            in_specs=(partition_specs(), *[P(sharding.DATA)] * 4),
            out_specs=P(),
            check_vma=False,
        )
    )(state, anchors, y, chosen, mask)
    own, theirs = assignment[anchors], assignment[np.maximum(chosen, 0)]
    both = mask & (chosen >= 0) & (own >= 0) & (theirs >= 0)
    assert 0 < both.sum() < G
    np.testing.assert_allclose(metrics["ssps/own_cluster_cos"], np.mean(np.sum(y * centroids[own], 1)[both]), rtol=1e-5)
    np.testing.assert_allclose(
        metrics["ssps/pseudo_cluster_cos"], np.mean(np.sum(y * centroids[theirs], 1)[both]), rtol=1e-5
    )
    assert metrics["ssps/coverage"] == pytest.approx(mask.mean())
