"""`ssps-jax plot WORKDIR`: a run's training curves and the DET curves of its last evaluation, as PNG.

Reads only what training and evaluation wrote: `metrics.jsonl` (one JSON record per logged step:
{"kind": "train" | "eval" | "ssps", "step": N, scalars...}) and `eval/step_<N>/<list>[.<norm>].scores.txt`
("score label enrol test"). A step logged twice (before and after a resume) keeps its last record. Writes

  WORKDIR/plots/training.png       one panel per training scalar (loss, lr, samples/s, SSPS diagnostics),
                                   one per evaluation metric (EER, minDCF; a line per trial list and score
                                   kind) and one per SSPS epoch scalar (NMI, clusters used)
  WORKDIR/plots/det_step_<N>.png   DET curves and score histograms of the newest evaluation
                                   (ssps_jax/evaluation/plots.py, as `make demo`'s comparison.png)
"""

from __future__ import annotations

import json
import math

import matplotlib
import numpy as np
from etils import epath

from ssps_jax.evaluation import plots

Series = dict[str, tuple[list[int], list[float]]]  # line label -> (steps, values)

# Scalars of every progress line that say how fast, not what was learnt: one panel for them.
_SPEED = ("steps_per_s",)


def curves(records: list[dict]) -> dict[str, Series]:
    """Panel title -> its lines, from metrics.jsonl's records (the last record of a (kind, step) wins)."""
    last: dict[tuple[str, int], dict] = {}
    for r in records:
        last[(r["kind"], r["step"])] = r
    panels: dict[str, Series] = {}
    for (kind, step), r in sorted(last.items(), key=lambda item: item[0][1]):
        for key, value in r.items():
            if key in ("kind", "step", *_SPEED) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            if kind == "eval":  # "<list>/<cosine|s-norm|as-norm>/<metric>": a panel per metric, a line per list/kind
                *line, metric = key.split("/")
                title, label = f"eval {metric}", "/".join(line)
            else:
                title, label = f"{kind} {key}", key
            steps, values = panels.setdefault(title, {}).setdefault(label, ([], []))
            steps.append(step)
            values.append(float(value))
    return panels


def read_metrics(workdir: epath.PathLike) -> list[dict]:
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_evaluation(workdir: epath.PathLike) -> tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]] | None:
    """(step, {"<list> <kind>": (scores, labels)}) of the newest eval/step_<N>/ with scores; None if none."""
    folders = [p for p in (epath.Path(workdir) / "eval").glob("step_*") if list(p.glob("*.scores.txt"))]
    if not folders:
        return None
    folder = max(folders, key=lambda p: int(p.name.removeprefix("step_")))
    runs = {}
    for path in sorted(folder.glob("*.scores.txt")):
        name = path.name.removesuffix(".scores.txt")
        trials, _, kind = name.partition(".")
        rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        scores = np.array([float(r[0]) for r in rows])
        labels = np.array([int(r[1]) for r in rows])
        runs[f"{trials} {kind or 'cosine'}"] = (scores, labels)
    return int(folder.name.removeprefix("step_")), runs


def plot(workdir: epath.PathLike) -> list[epath.Path]:
    """Writes WORKDIR/plots/training.png and det_step_<N>.png (what there is data for); returns their paths."""
    workdir = epath.Path(workdir)
    out = workdir / "plots"
    written = []
    panels = curves(read_metrics(workdir))
    if panels:
        out.mkdir(parents=True, exist_ok=True)
        written.append(_training_figure(panels, out / "training.png", str(workdir)))
    evaluation = last_evaluation(workdir)
    if evaluation is not None:
        step, runs = evaluation
        out.mkdir(parents=True, exist_ok=True)
        written.append(plots.compare(runs, out / f"det_step_{step}.png", f"{workdir}, step {step}"))
    return written


def _training_figure(panels: dict[str, Series], path: epath.Path, title: str) -> epath.Path:
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, panels.items()):
        for label, (steps, values) in lines.items():
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=label)
        ax.set(title=name, xlabel="step")
        if name == "train lr":
            ax.set_yscale("log")
        if len(lines) > 1:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)
    return path
