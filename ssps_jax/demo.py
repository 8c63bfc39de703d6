"""`make demo`: the embedded corpus, a baseline, then the same run continued with SSPS and without it.

  1. `ssps-jax prepare-demo` writes the corpus (if missing);
  2. <workdir>/baseline: the framework alone for `ssps.start_epoch` epochs
     (`train.stop_at_epoch`: learning-rate and momentum schedules span the
     whole run; its last epoch fills the SSPS queues, which does not change
     training);
  3. <workdir>/ssps: a copy of (2) continued with SSPS to `train.epochs`;
  4. <workdir>/fair_baseline: a copy of (2) continued for the same epochs
     without SSPS -- the fair baseline SSPS has to beat;
  4b. <workdir>/oracle: a copy of (2) continued with `ssps.sampling = "oracle"`
     (the anchor's speaker from another session, by labels): the headroom of
     positive sampling on this corpus, a diagnostic;
  5. a table (EER and minDCF with their bootstrap CIs, pseudo-positive speaker / session accuracy, NMI of
     the clustering) and <workdir>/comparison.png (DET curves and scores).
Every stage resumes: rerunning the command after an interruption continues
where it stopped, and finished stages are not trained again.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import ml_collections
import numpy as np

from data_pipelines.demo_corpus import corpus
from ssps_jax.evaluation import plots
from ssps_jax.evaluation.verification import trial_list_name
from ssps_jax.observe import say


def _records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _branch(source: Path, target: Path) -> Path:
    """A copy of a finished run to continue from (made once; atomically, so an interrupted copy is redone).

    The source's config.json is kept as config.json.branch_point: the branch runs
    another config on purpose, and `train` would otherwise note the difference.
    """
    if not target.exists():
        partial = target.with_name(target.name + ".copying")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial)
        (partial / "config.json").rename(partial / "config.json.branch_point")
        partial.rename(target)
    return target


def _scores(workdir: Path, step: int, trials: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [
        line.split() for line in (workdir / "eval" / f"step_{step}" / f"{trials}.scores.txt").read_text().splitlines()
    ]
    return np.array([float(r[0]) for r in rows]), np.array([int(r[1]) for r in rows])


def _row(workdir: Path, trials: str, which: int, after_step: int = 0) -> dict:
    """EER/minDCF of evaluation `which` (0 first, -1 last) and the SSPS diagnostics logged after `after_step`."""
    records = _records(workdir)
    evals = [r for r in records if r["kind"] == "eval"]
    e = evals[which]
    row = {"workdir": str(workdir), "step": e["step"]}
    row.update(eer=e[f"{trials}/cosine/eer"], min_dcf=e[f"{trials}/cosine/min_dcf_0.01"])
    row.update(_intervals(workdir, e["step"], trials))
    sampled = [r for r in records if r["kind"] == "train" and r["step"] > after_step and r.get("ssps/coverage", 0) > 0]
    # The label-free cluster cosines go to demo_results.json only (docs/demo_findings.md compares them).
    for key in ("coverage", "same_speaker", "same_session", "own_cluster_cos", "pseudo_cluster_cos"):
        values = [r[f"ssps/{key}"] for r in sampled if math.isfinite(r.get(f"ssps/{key}", math.nan))]
        row[key] = float(np.mean(values)) if values else math.nan
    clustering = [r for r in records if r["kind"] == "ssps" and r["step"] > after_step]
    for key in ("nmi_speaker", "nmi_session"):
        row[key] = clustering[-1].get(key, math.nan) if clustering else math.nan
    return row


def _intervals(workdir: Path, step: int, trials: str) -> dict:
    """The bootstrap CIs of EER and minDCF that the evaluation wrote to eval/step_N/metrics.json
    ([nan, nan] for an evaluation written before the CIs existed)."""
    path = workdir / "eval" / f"step_{step}" / "metrics.json"
    cosine = json.loads(path.read_text())["results"][trials]["cosine"] if path.is_file() else {}
    nan = [math.nan, math.nan]
    return {"eer_ci": cosine.get("eer_ci", nan), "min_dcf_ci": cosine.get("min_dcf_0.01_ci", nan)}


def run(data: str | Path, workdir: str | Path, config: ml_collections.ConfigDict, oracle: bool = False) -> dict:
    """Runs (or resumes) every stage; prints and returns the table; writes comparison.png.

    `oracle`: also the oracle-sampling continuation (`make demo`; demo-methods leaves it out)."""
    from ssps_jax import methods  # imports JAX: not needed to read this module
    from ssps_jax.ssps.samplers import oracle as oracle_sampler
    from ssps_jax.train import train

    data, workdir = Path(data), Path(workdir)
    if not (data / corpus.TRAIN_CSV).is_file():
        say(f"writing the demo corpus to {data} ...")
        corpus.write_demo_corpus(data, workers=os.cpu_count() or 1)
    config.data.train_csv = str(data / corpus.TRAIN_CSV)
    config.data.base_dir = str(data)
    config.eval.trials = (str(data / corpus.TRIALS),)
    if not config.ssps.enabled:
        raise ValueError("the demo compares a run with SSPS and one without: its config needs ssps.enabled")
    start, epochs = config.ssps.start_epoch, config.train.epochs
    name = methods.get(config.method).title

    base = config.copy_and_resolve_references()
    base.train.stop_at_epoch = start  # schedules still span train.epochs, so the continuations pick them up
    base.eval.at_start = True  # the untrained encoder too
    base.eval.every_epochs = start
    say(f"== 1 {name} for {start} epochs, the last one filling the SSPS queues: {workdir / 'baseline'}")
    train(base, workdir / "baseline")

    ssps = config.copy_and_resolve_references()
    ssps.eval.every_epochs = epochs
    say(f"== 2 continued with SSPS to epoch {epochs}: {workdir / 'ssps'}")
    train(ssps, _branch(workdir / "baseline", workdir / "ssps"))

    fair = ssps.copy_and_resolve_references()
    fair.ssps.enabled = False
    say(f"== 3 continued without SSPS to epoch {epochs} (the fair baseline): {workdir / 'fair_baseline'}")
    train(fair, _branch(workdir / "baseline", workdir / "fair_baseline"))

    if oracle:
        diagnostic = ssps.copy_and_resolve_references()
        diagnostic.ssps.sampling = oracle_sampler.SAMPLER.name
        say(f"== 4 continued with oracle positives (by labels; a diagnostic) to epoch {epochs}: {workdir / 'oracle'}")
        train(diagnostic, _branch(workdir / "baseline", workdir / "oracle"))

    trials = trial_list_name(corpus.TRIALS)
    baseline = _row(workdir / "baseline", trials, -1)
    after = baseline["step"]  # the end of epoch start - 1: where the continuations branch off
    table = {
        "untrained": _row(workdir / "baseline", trials, 0),
        f"{name}, {start} epochs": baseline,
        f"{name}, {epochs} epochs (fair baseline)": _row(workdir / "fair_baseline", trials, -1, after),
        f"{name}-SSPS, {epochs} epochs": _row(workdir / "ssps", trials, -1, after),
    }
    if oracle:
        table[f"{name}-oracle, {epochs} epochs"] = _row(workdir / "oracle", trials, -1, after)
    fair_row, ssps_row = list(table.values())[2:4]
    relative = (fair_row["eer"] - ssps_row["eer"]) / fair_row["eer"]
    _print(table, trials, relative)
    png = plots.compare(
        {
            f"{name} (fair baseline)": _scores(workdir / "fair_baseline", fair_row["step"], trials),
            f"{name}-SSPS": _scores(workdir / "ssps", ssps_row["step"], trials),
        },
        workdir / "comparison.png",
        f"{corpus.TRIALS}: held-out speakers, cross-session targets",
    )
    summary = {"trials": corpus.TRIALS, "runs": table, "ssps_relative_eer_improvement": relative}
    (workdir / "demo_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(f"DET curves and score histograms: {png}; numbers: {workdir / 'demo_results.json'}")
    return summary


def _print(table: dict, trials: str, relative: float) -> None:
    def pct(x):
        return "-" if math.isnan(x) else f"{100 * x:.1f}"

    def num(x):
        return "-" if math.isnan(x) else f"{x:.3f}"

    say("")
    say(f"demo results on {trials} (held-out speakers, cross-session targets)")

    def ci(interval, scale, digits):
        lo, hi = interval
        return "" if math.isnan(lo) else f"[{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"

    header = f"  {'run':<36}{'step':>6}{'EER %':>8}{'95% CI':>15}{'minDCF':>8}{'95% CI':>17}"
    header += f"{'cov %':>7}{'spk %':>7}{'ses %':>7}"
    say(header + f"{'NMI spk':>9}{'NMI ses':>9}")
    for label, r in table.items():
        say(
            f"  {label:<36}{r['step']:>6}{100 * r['eer']:>8.2f}{ci(r['eer_ci'], 100, 2):>15}"
            f"{r['min_dcf']:>8.4f}{ci(r['min_dcf_ci'], 1, 4):>17}{pct(r['coverage']):>7}"
            f"{pct(r['same_speaker']):>7}{pct(r['same_session']):>7}{num(r['nmi_speaker']):>9}"
            f"{num(r['nmi_session']):>9}"
        )
    say(
        "  cov: anchors given a pseudo-positive; spk / ses: pseudo-positives of the anchor's speaker / session; "
        "NMI: last clustering vs speakers / sessions (labels used for these diagnostics only); "
        "CI: bootstrap over trials (eval.confidence); oracle: positives of the anchor's speaker from another "
        "session, by labels -- the headroom of any positive sampling, not a method"
    )
    say(f"  SSPS vs the fair baseline: EER {100 * relative:+.1f}% relative improvement")
