"""EER and minDCF against a brute-force threshold sweep, scikit-learn, and hand-made cases."""

import itertools

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from ssps_jax.evaluation.metrics import eer, eer_threshold, min_dcf


def _brute_force_points(scores, labels):
    """(FPR, FNR) at every candidate threshold, by counting, one threshold at a time."""
    thresholds = [*sorted(set(scores)), np.inf]
    points = [(1.0, 0.0)]  # threshold -inf: accept everything
    targets = [s for s, y in zip(scores, labels) if y == 1]
    nontargets = [s for s, y in zip(scores, labels) if y == 0]
    for th in thresholds:
        fnr = sum(s < th for s in targets) / len(targets)
        fpr = sum(s >= th for s in nontargets) / len(nontargets)
        points.append((fpr, fnr))
    return points


def _brute_force_min_dcf(scores, labels, p=0.01):
    return min(p * fnr + (1 - p) * fpr for fpr, fnr in _brute_force_points(scores, labels)) / min(p, 1 - p)


def _brute_force_eer(scores, labels):
    """Walk the points until FNR overtakes FPR; intersect that segment with FNR = FPR."""
    points = _brute_force_points(scores, labels)
    for (fpr0, fnr0), (fpr1, fnr1) in itertools.pairwise(points):
        if fnr1 - fpr1 >= 0:
            if fnr1 == fpr1:
                return fpr1
            t = (fpr0 - fnr0) / ((fnr1 - fnr0) - (fpr1 - fpr0))
            return fpr0 + t * (fpr1 - fpr0)
    raise AssertionError("no crossing")


@pytest.mark.parametrize("seed", range(5))
def test_random_scores_match_brute_force_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(size=300) + 1.2 * labels
    if seed % 2:
        scores = np.round(scores, 1)  # plenty of ties
    assert eer(scores, labels) == pytest.approx(_brute_force_eer(list(scores), list(labels)), abs=1e-12)
    assert min_dcf(scores, labels) == pytest.approx(_brute_force_min_dcf(list(scores), list(labels)), abs=1e-12)
    for p in (0.05, 0.5):
        assert min_dcf(scores, labels, p_target=p) == pytest.approx(
            _brute_force_min_dcf(list(scores), list(labels), p), abs=1e-12
        )
    if seed % 2 == 0:
        # Without ties, the EER is where scikit-learn's ROC crosses FNR = FPR.
        fpr, tpr, _ = roc_curve(labels, scores)
        fnr = 1 - tpr
        k = np.argmax(fnr <= fpr)  # roc_curve goes from low FPR to high
        t = (fpr[k - 1] - fnr[k - 1]) / ((fnr[k] - fnr[k - 1]) - (fpr[k] - fpr[k - 1]))
        assert eer(scores, labels) == pytest.approx(fpr[k - 1] + t * (fpr[k] - fpr[k - 1]), abs=1e-12)


def test_hand_made_cases():
    labels = [1, 1, 0, 0]
    assert eer([0.9, 0.8, 0.1, 0.2], labels) == 0.0  # all correct
    assert min_dcf([0.9, 0.8, 0.1, 0.2], labels) == 0.0
    assert eer([0.1, 0.2, 0.9, 0.8], labels) == 1.0  # all wrong
    assert min_dcf([0.1, 0.2, 0.9, 0.8], labels) == pytest.approx(1.0)  # = reject everything
    assert eer([0.5, 0.5, 0.5, 0.5], labels) == 0.5  # all tied: no information
    # Target 0.3 below non-target 0.5: threshold 0.4 misses 1 of 2 and accepts 1 of 2.
    assert eer([0.9, 0.3, 0.5, 0.1], labels) == pytest.approx(0.5)
    # minDCF, p = 0.01: one miss costs 0.01 * 1/2 = 0.005 -> normalised 0.5; one false alarm 0.99 * 1/2.
    assert min_dcf([0.9, 0.3, 0.5, 0.1], labels) == pytest.approx(0.5)
    # A target tied with a non-target: they are accepted or rejected together, so the
    # crossing lies between (FPR, FNR) = (1/2, 0) and (0, 1/2): 25%.
    assert eer([0.9, 0.5, 0.5, 0.1], labels) == pytest.approx(0.25)


def test_min_dcf_at_p_target_0_05_by_hand():
    # Targets 0.9, 0.5, 0.4; one non-target (0.6) above the two lower targets, 39 below them all.
    scores = [0.9, 0.5, 0.4, 0.6, *np.linspace(-0.5, 0.3, 39)]
    labels = [1, 1, 1] + [0] * 40
    # Normalised cost FNR + FPR (1 - p) / p. Threshold 0.9: FNR 2/3, FPR 0 -> 2/3 at any p.
    # Threshold 0.4: FNR 0, FPR 1/40 -> 19/40 at p = 0.05 (the minimum), 99/40 at p = 0.01.
    assert min_dcf(scores, labels, p_target=0.05) == pytest.approx(19 / 40, abs=1e-12)
    assert min_dcf(scores, labels, p_target=0.01) == pytest.approx(2 / 3, abs=1e-12)


def test_needs_both_kinds_of_trials():
    with pytest.raises(ValueError, match="target and non-target"):
        eer([0.1, 0.2], [1, 1])


def _rates_at(threshold, scores, labels):
    scores, labels = np.asarray(scores), np.asarray(labels).astype(bool)
    accept = scores >= threshold
    return float(np.mean(accept[~labels])), float(np.mean(~accept[labels]))  # FPR, FNR


def test_eer_threshold_decides_at_the_eer():
    # Hand case: targets 0.4, 0.6, 0.8, 0.9; non-targets 0.1, 0.3, 0.5, 0.7.
    # Accepting >= 0.55 (any threshold in (0.5, 0.6]) gives FPR = FNR = 1/4.
    scores = [0.4, 0.6, 0.8, 0.9, 0.1, 0.3, 0.5, 0.7]
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    assert eer(scores, labels) == pytest.approx(0.25)
    assert eer_threshold(scores, labels) == pytest.approx(0.55)
    assert eer_threshold([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == pytest.approx(0.5)  # separated: between the classes

    # Random scores with ties: counted directly, the decision at the threshold has FNR >= FPR, the decision at the
    # next lower score still has FNR <= FPR (so it is the point at or just past the crossing), and its rates
    # bracket the EER.
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(0, 2, 300)
        scores = np.round(rng.normal(labels * 1.0, 1.0), 2)
        threshold = eer_threshold(scores, labels)
        fpr, fnr = _rates_at(threshold, scores, labels)
        below_fpr, below_fnr = _rates_at(scores[scores < threshold].max(), scores, labels)
        assert fnr >= fpr - 1e-12 and below_fnr <= below_fpr + 1e-12
        assert min(fpr, fnr) - 1e-12 <= eer(scores, labels) <= max(fpr, fnr) + 1e-12
