"""S-Norm / AS-Norm against a loop-by-loop reference, their invariances, and the trial bootstrap's behaviour."""

import math

import numpy as np
import pytest

from ssps_jax.evaluation import metrics, scoring


def _cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _side_stats(x, cohort, top_k, ddof):
    """Mean and std of the top_k highest cosines of x with the cohort, by hand."""
    scores = sorted((_cos(x, c) for c in cohort), reverse=True)[:top_k]
    mean = sum(scores) / top_k
    return mean, math.sqrt(sum((s - mean) ** 2 for s in scores) / (top_k - ddof))


def _reference_norm(emb, pairs, cohort, top_k, ddof=1):
    """The normalisation formula, one trial at a time, recomputing both sides' statistics for every trial."""
    emb, cohort = emb.tolist(), cohort.tolist()
    out = []
    for e, t in pairs.tolist():
        s = _cos(emb[e], emb[t])
        mu_e, sd_e = _side_stats(emb[e], cohort, top_k, ddof)
        mu_t, sd_t = _side_stats(emb[t], cohort, top_k, ddof)
        out.append(0.5 * ((s - mu_e) / sd_e + (s - mu_t) / sd_t))
    return np.array(out)


def _random_case(seed=0, n_utts=12, dim=8, n_cohort=40, n_trials=50):
    rng = np.random.default_rng(seed)
    # Not unit norm: the functions score cosines, so they must normalise.
    emb = rng.normal(size=(n_utts, dim)) * rng.uniform(0.5, 2.0, size=(n_utts, 1))
    cohort = rng.normal(size=(n_cohort, dim))
    pairs = rng.integers(0, n_utts, size=(n_trials, 2))
    return emb, pairs, cohort


@pytest.mark.parametrize("ddof", [0, 1])
def test_s_norm_matches_reference(ddof):
    emb, pairs, cohort = _random_case()
    got = scoring.s_norm(emb, pairs, cohort, ddof=ddof)
    np.testing.assert_allclose(got, _reference_norm(emb, pairs, cohort, len(cohort), ddof), rtol=0, atol=1e-10)


@pytest.mark.parametrize("top_k", [2, 7, 39])
def test_as_norm_matches_reference(top_k):
    emb, pairs, cohort = _random_case(seed=1)
    got = scoring.as_norm(emb, pairs, cohort, top_k=top_k)
    np.testing.assert_allclose(got, _reference_norm(emb, pairs, cohort, top_k), rtol=0, atol=1e-10)


def test_chunking_does_not_change_scores():
    emb, pairs, cohort = _random_case(seed=2, n_utts=30)
    whole = scoring.as_norm(emb, pairs, cohort, top_k=10)
    # 40-element chunks: one utterance per chunk; 130: three, the last chunk partial.
    for chunk_elements in (40, 130, 1):
        chunked = scoring.as_norm(emb, pairs, cohort, 10, chunk_elements=chunk_elements)
        np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-12)  # BLAS may round by row block


def test_as_norm_with_whole_cohort_is_s_norm():
    emb, pairs, cohort = _random_case(seed=3)
    np.testing.assert_allclose(
        scoring.as_norm(emb, pairs, cohort, top_k=len(cohort)), scoring.s_norm(emb, pairs, cohort), atol=1e-12
    )
    # And a smaller top_k does change them (the test above could not tell AS-Norm from S-Norm otherwise).
    assert np.abs(scoring.as_norm(emb, pairs, cohort, top_k=5) - scoring.s_norm(emb, pairs, cohort)).max() > 0.1


def test_cohort_order_does_not_matter():
    emb, pairs, cohort = _random_case(seed=4)
    perm = np.random.default_rng(0).permutation(len(cohort))
    for norm in (scoring.s_norm, lambda *a: scoring.as_norm(*a, top_k=9)):
        np.testing.assert_allclose(norm(emb, pairs, cohort[perm]), norm(emb, pairs, cohort), atol=1e-12)


def test_invalid_top_k():
    emb, pairs, cohort = _random_case()
    for top_k in (0, 1, len(cohort) + 1):  # 1: a std with ddof=1 over one score is undefined
        with pytest.raises(ValueError, match="top_k"):
            scoring.as_norm(emb, pairs, cohort, top_k=top_k)


def test_normalisation_removes_a_per_utterance_offset():
    """Half the enrol utterances carry a strong 'channel' direction that every test and cohort utterance shares.

    Raw cosines (noise aside): an even enrol's targets 1/sqrt(2) = 0.71, an odd enrol's targets
    4/sqrt(20) = 0.89 but its non-targets 3/sqrt(20) = 0.67, among the even targets: no global threshold
    separates them. Each enrol's cohort mean (0 or 0.67) measures its shift and normalising removes it.
    """
    rng = np.random.default_rng(5)
    dim, n_spk = 64, 20
    speakers = np.eye(dim)[:n_spk]  # orthogonal speaker directions
    channel = np.eye(dim)[-1]

    def utt(direction, channel_gain):
        return direction + channel_gain * channel + 0.05 * rng.normal(size=dim)

    enrol = [utt(speakers[s], 3.0 if s % 2 else 0.0) for s in range(n_spk)]
    test = [utt(speakers[s], 1.0) for s in range(n_spk)]
    emb = np.array(enrol + test)
    pairs = np.array([(e, n_spk + t) for e in range(n_spk) for t in range(n_spk)])
    labels = (pairs[:, 0] == pairs[:, 1] - n_spk).astype(int)
    # Cohort: other speakers (directions no test speaker uses), with the test side's channel gain.
    others = np.eye(dim)[n_spk : dim - 1]
    cohort = np.array([utt(others[i % len(others)], 1.0) for i in range(200)])

    assert metrics.eer(scoring.cosine_scores(emb, pairs), labels) > 0.15
    assert metrics.eer(scoring.s_norm(emb, pairs, cohort), labels) == 0.0
    assert metrics.eer(scoring.as_norm(emb, pairs, cohort, top_k=50), labels) == 0.0


def _synthetic_trials(n_target, n_nontarget, seed=0):
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.normal(2.0, 1.0, n_target), rng.normal(0.0, 1.0, n_nontarget)]
    labels = np.r_[np.ones(n_target, int), np.zeros(n_nontarget, int)]
    perm = rng.permutation(len(scores))
    return scores[perm], labels[perm]


def test_bootstrap_ci_contains_point_estimate_and_is_seeded():
    scores, labels = _synthetic_trials(300, 3000)
    point = metrics.eer(scores, labels)
    low, high = scoring.bootstrap_ci(scores, labels, metrics.eer, n_resamples=300, seed=1)
    assert low < point < high
    assert 0.0 < high - low < 0.1
    assert scoring.bootstrap_ci(scores, labels, metrics.eer, n_resamples=300, seed=1) == (low, high)
    assert scoring.bootstrap_ci(scores, labels, metrics.eer, n_resamples=300, seed=2) != (low, high)


def test_bootstrap_ci_narrows_with_more_trials():
    def width(n):
        low, high = scoring.bootstrap_ci(*_synthetic_trials(n, 10 * n), metrics.eer, n_resamples=200)
        return high - low

    # Width ~ 1 / sqrt(trials): 100x the trials should give about a tenth.
    small, large = width(100), width(10_000)
    assert 5 < small / large < 20


def test_bootstrap_resamples_each_class_with_replacement():
    scores, labels = _synthetic_trials(50, 400, seed=3)
    target_scores, nontarget_scores = set(scores[labels == 1]), set(scores[labels == 0])
    seen = []

    def spy(s, y):
        seen.append((s, y))
        return 0.0

    scoring.bootstrap_ci(scores, labels, spy, n_resamples=20)
    assert len(seen) == 20
    for s, y in seen:
        assert (y == 1).sum() == 50 and (y == 0).sum() == 400
        assert set(s[y == 1]) <= target_scores and set(s[y == 0]) <= nontarget_scores
        # With replacement: 50 draws from 50 repeat some trials (all distinct has probability 50!/50**50).
        assert len(set(s[y == 1])) < 50
    assert not all(np.array_equal(seen[0][0], s) for s, _ in seen[1:])


def test_bootstrap_matches_normal_theory_for_a_mean():
    """The bootstrap of a class mean has the sampling spread of that mean: +-1.96 sd / sqrt(n)."""
    scores, labels = _synthetic_trials(400, 400, seed=4)
    low, high = scoring.bootstrap_ci(scores, labels, lambda s, y: s[y == 1].mean(), n_resamples=1000)
    expected = 2 * 1.96 * scores[labels == 1].std() / math.sqrt(400)
    assert high - low == pytest.approx(expected, rel=0.15)
    assert low < scores[labels == 1].mean() < high


def test_bootstrap_min_dcf_and_bad_arguments():
    scores, labels = _synthetic_trials(200, 2000)
    low, high = scoring.bootstrap_ci(scores, labels, lambda s, y: metrics.min_dcf(s, y, p_target=0.05), 200)
    assert low <= metrics.min_dcf(scores, labels, p_target=0.05) <= high
    with pytest.raises(ValueError, match="confidence"):
        scoring.bootstrap_ci(scores, labels, metrics.eer, confidence=1.0)
    with pytest.raises(ValueError, match="target"):
        scoring.bootstrap_ci(scores, np.ones_like(labels), metrics.eer)


def test_bootstrap_metrics_equals_bootstrap_ci_of_each_metric():
    """bootstrap_metrics resamples as bootstrap_ci does without expanding: same seed, same intervals, ties included."""
    scores, labels = _synthetic_trials(120, 700, seed=5)
    scores[:200] = np.round(scores[:200], 1)  # many ties, across classes
    got = scoring.bootstrap_metrics(scores, labels, n_resamples=150, confidence=0.9, seed=7)
    expected = {
        "eer": scoring.bootstrap_ci(scores, labels, metrics.eer, 150, 0.9, seed=7),
        "min_dcf_0.01": scoring.bootstrap_ci(scores, labels, lambda s, y: metrics.min_dcf(s, y, 0.01), 150, 0.9, 7),
        "min_dcf_0.05": scoring.bootstrap_ci(scores, labels, lambda s, y: metrics.min_dcf(s, y, 0.05), 150, 0.9, 7),
    }
    assert set(got) == set(expected)
    for name, interval in expected.items():
        assert got[name] == interval, name
    point = metrics.eer(scores, labels)
    assert got["eer"][0] < point < got["eer"][1]
