"""Speaker-verification metrics: EER and minDCF (docs/method.md §9).

A trial is accepted when its score >= threshold. Sweeping the threshold over
every distinct score (and past the largest) gives the operating points
(FPR, FNR), tied scores moving together.

* minDCF = min over operating points of
  (C_miss P_target FNR + C_fa (1 - P_target) FPR) / min(C_miss P_target, C_fa (1 - P_target)).
* EER is where FNR = FPR on the ROC drawn through the operating points with
  straight segments (the error rate of the randomised decision between two
  neighbouring thresholds). With all scores tied it is 50%, with perfectly
  separated scores 0%, with perfectly inverted ones 100%.
Both are returned as fractions (x100 for %). minDCF is reported at two
operating priors, P_target = 0.01 (sslsv's and VoxSRC's until 2020) and 0.05
(VoxSRC since 2021), both with C_miss = C_fa = 1.

The `*_from_rates` functions take the operating points instead of the scores,
along the last axis of any batch of them: the bootstrap (scoring.py) builds
the points of a thousand resamples at once and reads every metric off them.
"""

from __future__ import annotations

import numpy as np

P_TARGETS = (0.01, 0.05)  # minDCF priors reported (metric names "min_dcf_0.01", "min_dcf_0.05")


def operating_points(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, FNR) at thresholds -inf, each distinct score in increasing order, +inf."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels).astype(bool)
    n_target, n_nontarget = labels.sum(), (~labels).sum()
    if n_target == 0 or n_nontarget == 0:
        raise ValueError(f"need target and non-target trials, got {n_target} and {n_nontarget}")
    order = np.argsort(scores, kind="stable")
    scores, labels = scores[order], labels[order]
    # Trials rejected at threshold = the next distinct score: everything before it.
    last_of_run = np.r_[scores[1:] != scores[:-1], True]
    rejected_targets = np.cumsum(labels)[last_of_run]
    rejected_nontargets = np.cumsum(~labels)[last_of_run]
    fnr = np.r_[0.0, rejected_targets / n_target]
    fpr = np.r_[1.0, 1.0 - rejected_nontargets / n_nontarget]
    return fpr, fnr


def eer_from_rates(fpr: np.ndarray, fnr: np.ndarray) -> np.ndarray:
    """EER of operating points (..., P) as `operating_points` orders them (FNR - FPR non-decreasing)."""
    fpr, fnr = np.asarray(fpr, np.float64), np.asarray(fnr, np.float64)
    diff = fnr - fpr  # goes from -1 to +1, non-decreasing
    k = np.argmax(diff >= 0, axis=-1)[..., None]  # first point at or past the crossing
    before = np.maximum(k - 1, 0)
    d_k, d_before = np.take_along_axis(diff, k, -1), np.take_along_axis(diff, before, -1)
    f_k, f_before = np.take_along_axis(fpr, k, -1), np.take_along_axis(fpr, before, -1)
    on_point = (d_k == 0) | (k == 0)
    # Otherwise the crossing lies on the segment between points k-1 and k.
    t = np.where(on_point, 0.0, -d_before / np.where(on_point, 1.0, d_k - d_before))
    return np.where(on_point, f_k, f_before + t * (f_k - f_before))[..., 0]


def min_dcf_from_rates(
    fpr: np.ndarray, fnr: np.ndarray, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0
) -> np.ndarray:
    cost = c_miss * p_target * np.asarray(fnr) + c_fa * (1 - p_target) * np.asarray(fpr)
    return cost.min(axis=-1) / min(c_miss * p_target, c_fa * (1 - p_target))


def metric_names(p_targets=P_TARGETS) -> list[str]:
    return ["eer", *(f"min_dcf_{p:g}" for p in p_targets)]


def from_rates(fpr: np.ndarray, fnr: np.ndarray, p_targets=P_TARGETS) -> dict[str, np.ndarray]:
    """{"eer", "min_dcf_<p>" for each p}: every reported metric of the operating points (..., P)."""
    values = [eer_from_rates(fpr, fnr), *(min_dcf_from_rates(fpr, fnr, p) for p in p_targets)]
    return dict(zip(metric_names(p_targets), values))


def eer_threshold(scores, labels) -> float:
    """The decision threshold at the EER: accepting score >= it gives the operating point at or just past the
    crossing of FNR and FPR. Every threshold between the score below that point's and its own gives it; this
    is the one halfway (just above the largest score when the point rejects everything).
    """
    fpr, fnr = operating_points(scores, labels)
    distinct = np.unique(np.asarray(scores, np.float64))  # point i >= 1 rejects the i smallest distinct scores
    k = int(np.argmax(fnr - fpr >= 0))  # >= 1: point 0 accepts everything (FNR 0, FPR 1)
    if k == len(distinct):
        return float(np.nextafter(distinct[-1], np.inf))
    return float((distinct[k - 1] + distinct[k]) / 2)


def eer(scores, labels) -> float:
    return float(eer_from_rates(*operating_points(scores, labels)))


def min_dcf(scores, labels, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    return float(min_dcf_from_rates(*operating_points(scores, labels), p_target, c_miss, c_fa))
