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
Both are returned as fractions (x100 for %).
"""

from __future__ import annotations

import numpy as np


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


def eer(scores, labels) -> float:
    fpr, fnr = operating_points(scores, labels)
    diff = fnr - fpr  # goes from -1 to +1, non-decreasing
    k = int(np.argmax(diff >= 0))  # first point at or past the crossing
    if diff[k] == 0 or k == 0:
        return float(fpr[k])
    # Crossing on the segment between points k-1 and k.
    t = -diff[k - 1] / (diff[k] - diff[k - 1])
    return float(fpr[k - 1] + t * (fpr[k] - fpr[k - 1]))


def min_dcf(scores, labels, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    fpr, fnr = operating_points(scores, labels)
    cost = c_miss * p_target * fnr + c_fa * (1 - p_target) * fpr
    return float(cost.min() / min(c_miss * p_target, c_fa * (1 - p_target)))
