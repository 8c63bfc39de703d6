"""Cohort score normalisation (S-Norm, AS-Norm) and bootstrap confidence intervals for verification metrics.

Score normalisation (docs/method.md §9 scores a trial by the cosine of its two
embeddings). Some utterances score high, or low, against everybody (a channel,
a recording condition), which shifts all of their trials and costs errors at a
single global threshold. S-Norm measures that shift per utterance against a
cohort of impostor embeddings (training utterances, none of the test speakers)
and removes it:

    s_norm = 0.5 * ((s - mu_e) / sd_e + (s - mu_t) / sd_t)

where s is the trial's cosine and mu_x, sd_x are the mean and standard
deviation of the cosines of side x's embedding with the cohort: all of them for
S-Norm, the side's top_k highest for adaptive S-Norm (AS-Norm), which models
the impostors closest to the utterance, the ones that cause false accepts.

The trials of a list share utterances (VoxCeleb1-E: 579,818 trials over
145,160 utterances), so the functions take the unique embeddings and the
trials as index pairs into them, and compute each utterance's cohort
statistics once, chunked so that the (utterances, cohort) score matrix never
has to be held whole.

Confidence intervals: `bootstrap_ci` resamples trials (see its docstring for
what that does and does not cover) for any metric function; `bootstrap_metrics`
draws the same resamples and reads EER and every minDCF off each at once,
without materialising it (what evaluation runs: bounded cost on 580k trials).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ssps_jax.evaluation import metrics
from ssps_jax.evaluation.embedding import l2_normalise

# AS-Norm's top-k: sslsv's CosineSVEvaluationTaskConfig.score_norm_cohort_size = 300
# (theolepage/sslsv, sslsv/evaluations/CosineSVEvaluation.py), also wespeaker's
# examples/voxceleb/v2/run.sh (top_n=300). The cohort itself is the caller's choice:
# sslsv scores against every training utterance's embedding (S-Norm uses them all),
# wespeaker against the per-speaker mean embeddings of VoxCeleb2-dev (5,994 speakers).
AS_NORM_TOP_K = 300

# The cohort scores' standard deviation with Bessel's correction, as sslsv's torch.std
# (wespeaker's np.std uses ddof=0; with 300 scores the two differ by 0.17%).
STD_DDOF = 1

# Cohort-score matrix elements per chunk of utterances: 2**24 float64 = 128 MiB.
CHUNK_ELEMENTS = 2**24


def cosine_scores(emb: np.ndarray, pairs: np.ndarray, chunk_elements: int = CHUNK_ELEMENTS) -> np.ndarray:
    """(T,) cosine of each trial: `emb` (U, D) the unique embeddings, `pairs` (T, 2) rows of (enrol, test) in it.

    Chunked over trials: the gathered (T, D) pairs of VoxCeleb1-E would take 2 x 2.4 GB at D = 512.
    """
    emb = l2_normalise(emb)
    pairs = np.asarray(pairs)
    rows = max(1, chunk_elements // emb.shape[1])
    out = np.empty(len(pairs))
    for start in range(0, len(pairs), rows):
        e, t = pairs[start : start + rows, 0], pairs[start : start + rows, 1]
        out[start : start + rows] = np.einsum("td,td->t", emb[e], emb[t])
    return out


def cohort_stats(
    emb: np.ndarray,
    cohort: np.ndarray,
    top_k: int | None = None,
    ddof: int = STD_DDOF,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std), each (U,), of each embedding's cosines with the cohort (C, D): all C, or its top_k highest."""
    emb, cohort = l2_normalise(emb), l2_normalise(cohort)
    n_cohort = len(cohort)
    k = n_cohort if top_k is None else int(top_k)
    if not ddof < k <= n_cohort:
        raise ValueError(f"top_k must be in ({ddof}, {n_cohort}] (cohort size), got {k}")
    rows = max(1, chunk_elements // n_cohort)
    mean, std = np.empty(len(emb)), np.empty(len(emb))
    for start in range(0, len(emb), rows):
        s = emb[start : start + rows] @ cohort.T
        if k < n_cohort:
            # The k highest, in no particular order (mean and std don't need one): O(C) per row, not a sort.
            s = np.partition(s, n_cohort - k, axis=1)[:, n_cohort - k :]
        mean[start : start + rows] = s.mean(axis=1)
        std[start : start + rows] = s.std(axis=1, ddof=ddof)
    return mean, std


def normalise(raw: np.ndarray, pairs: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Symmetric normalisation of raw trial scores with per-utterance cohort statistics (mean, std indexed by pairs)."""
    pairs = np.asarray(pairs)
    e, t = pairs[:, 0], pairs[:, 1]
    return 0.5 * ((raw - mean[e]) / std[e] + (raw - mean[t]) / std[t])


def s_norm(
    emb: np.ndarray, pairs: np.ndarray, cohort: np.ndarray, ddof: int = STD_DDOF, chunk_elements: int = CHUNK_ELEMENTS
) -> np.ndarray:
    """(T,) S-Norm scores of the trials `pairs` (T, 2) over the unique embeddings `emb` (U, D), cohort (C, D)."""
    mean, std = cohort_stats(emb, cohort, None, ddof, chunk_elements)
    return normalise(cosine_scores(emb, pairs), pairs, mean, std)


def as_norm(
    emb: np.ndarray,
    pairs: np.ndarray,
    cohort: np.ndarray,
    top_k: int = AS_NORM_TOP_K,
    ddof: int = STD_DDOF,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> np.ndarray:
    """(T,) AS-Norm scores: S-Norm with each side's statistics taken over its top_k highest cohort scores."""
    mean, std = cohort_stats(emb, cohort, top_k, ddof, chunk_elements)
    return normalise(cosine_scores(emb, pairs), pairs, mean, std)


def bootstrap_ci(
    scores: np.ndarray,
    labels: np.ndarray,
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of metric_fn(scores, labels), e.g. metrics.eer, over the trials.

    Each resample draws, with replacement, as many target trials from the
    targets and as many non-target trials from the non-targets as the list has
    (stratified): EER and minDCF are functions of the two error rates, each
    estimated from its own class, and the list's class counts are fixed by
    design, not random. The interval is the (1 - confidence) / 2 and
    (1 + confidence) / 2 quantiles of the resampled metric.

    Limitation: this treats trials as independent. They are not: a VoxCeleb
    utterance appears in many trials and a speaker in many more, so errors are
    correlated and this interval is too narrow for the question "how would the
    metric vary over other speakers and recordings"; resampling speakers (and
    every trial among them) would give a wider, more honest interval. What it
    does measure is the sampling noise of the trial list given its speakers.

    Cost: the trials are sorted by score once; a resample is then drawn as a
    count per trial and expanded in sorted order, so metric_fn sorts an already
    sorted array (linear for NumPy's stable sort) and each resample costs O(T): 1000 resamples of
    metrics.eer over 579,818 trials (VoxCeleb1-E) took 24 s on 2 CPU cores, against ~70 s with a sort each.
    `bootstrap_metrics` draws the same resamples without expanding them, for EER and minDCF.
    """
    scores, labels, classes = _sorted_by_score(scores, labels, confidence)
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    for r in range(n_resamples):
        picked = np.repeat(np.arange(len(scores)), _resample_counts(rng, classes, len(scores)))
        stats[r] = metric_fn(scores[picked], labels[picked])  # picked is sorted: the resample stays sorted by score
    return _interval(stats, confidence)


def bootstrap_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    p_targets=metrics.P_TARGETS,
) -> dict[str, tuple[float, float]]:
    """{"eer", "min_dcf_<p>"...: (low, high)}: `bootstrap_ci` of every reported metric, from the same resamples.

    The resamples are those `bootstrap_ci` draws with the same seed (so the intervals are equal to its
    intervals of metrics.eer and metrics.min_dcf), but a resample is never expanded: with the trials
    sorted by score, its operating points are cumulative sums of its per-trial counts, and all metrics
    are read off them (metrics.from_rates). A distinct score the resample did not draw only repeats the
    previous operating point, which changes no metric. Cost: 1000 resamples of 579,818 trials
    (VoxCeleb1-E), all three metrics, took 10 s of CPU on the 2-core development machine.
    """
    scores, labels, classes = _sorted_by_score(scores, labels, confidence)
    is_target = labels.astype(bool)
    n_target, n_nontarget = len(classes[0]), len(classes[1])
    # Operating points sit at the last trial of each run of equal scores (every trial when none tie).
    ties = scores[1:] == scores[:-1]
    run_ends = np.flatnonzero(~np.r_[ties, False]) if ties.any() else slice(None)
    rng = np.random.default_rng(seed)
    names = metrics.metric_names(p_targets)
    stats = np.empty((n_resamples, len(names)))
    for r in range(n_resamples):
        counts = _resample_counts(rng, classes, len(scores))
        # Rejected trials (with repeats) at each point; one resample at a time: NumPy's cumsum is slow along axis 1.
        rejected_targets = np.cumsum(counts * is_target)[run_ends]
        rejected_nontargets = np.cumsum(counts)[run_ends] - rejected_targets
        # The operating points as metrics.operating_points gives them for the expanded resample.
        fnr = np.r_[0.0, rejected_targets / n_target]
        fpr = np.r_[1.0, 1.0 - rejected_nontargets / n_nontarget]
        stats[r] = list(metrics.from_rates(fpr, fnr, p_targets).values())
    return {name: _interval(stats[:, i], confidence) for i, name in enumerate(names)}


def _sorted_by_score(scores, labels, confidence):
    """(scores, labels) sorted by score, and the sorted positions of the target and non-target trials."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    order = np.argsort(scores, kind="stable")
    scores, labels = scores[order], labels[order]
    is_target = labels.astype(bool)
    classes = [np.flatnonzero(is_target), np.flatnonzero(~is_target)]
    if any(len(c) == 0 for c in classes):
        raise ValueError("need target and non-target trials")
    return scores, labels, classes


def _resample_counts(rng: np.random.Generator, classes: list[np.ndarray], n: int) -> np.ndarray:
    """(n,) how many times one stratified resample draws each trial: each class as many times as it has trials."""
    drawn = [positions[rng.integers(0, len(positions), len(positions))] for positions in classes]
    return np.bincount(np.concatenate(drawn), minlength=n)


def _interval(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    """The percentile interval: the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles."""
    alpha = 1 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)
