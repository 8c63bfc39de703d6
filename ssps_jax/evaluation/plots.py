"""Pictures of verification results: DET curves and score histograms, side by side."""

from __future__ import annotations

import matplotlib
import numpy as np
from etils import epath
from scipy.stats import norm

from ssps_jax.evaluation import metrics

_TICKS = np.array([0.1, 0.5, 1, 2, 5, 10, 20, 40, 60, 80, 90])  # %


def compare(runs: dict[str, tuple[np.ndarray, np.ndarray]], path: epath.PathLike, title: str) -> epath.Path:
    """Writes a PNG: DET curves (probit axes) of every run, and each run's target / non-target scores.

    runs: name -> (scores, labels) on the same trials.
    """
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(runs), figsize=(5 * (1 + len(runs)), 4.5))
    det = axes[0]
    clip = (1e-4, 1 - 1e-4)  # probit of 0 or 1 is infinite
    for name, (scores, labels) in runs.items():
        fpr, fnr = metrics.operating_points(scores, labels)
        eer = 100 * metrics.eer(scores, labels)
        det.plot(norm.ppf(np.clip(fpr, *clip)), norm.ppf(np.clip(fnr, *clip)), label=f"{name} (EER {eer:.2f}%)")
    ticks = norm.ppf(_TICKS / 100)
    for axis in (det.xaxis, det.yaxis):
        axis.set_ticks(ticks, [f"{t:g}" for t in _TICKS])
    det.set(xlim=(ticks[0], ticks[-1]), ylim=(ticks[0], ticks[-1]), xlabel="false alarm (%)", ylabel="miss (%)")
    det.set_title("DET")
    det.plot([ticks[0], ticks[-1]], [ticks[0], ticks[-1]], color="grey", linewidth=0.5)
    det.legend(fontsize=8)
    det.grid(alpha=0.3)
    bins = np.linspace(-1, 1, 61)
    for ax, (name, (scores, labels)) in zip(axes[1:], runs.items()):
        labels = np.asarray(labels).astype(bool)
        ax.hist(scores[~labels], bins, alpha=0.6, density=True, label="non-target")
        ax.hist(scores[labels], bins, alpha=0.6, density=True, label="target")
        ax.set(title=name, xlabel="cosine score")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = epath.Path(path)
    with path.open("wb") as f:  # matplotlib writes a file object: a gs:// path too
        fig.savefig(f, format=path.suffix[1:] or "png", dpi=100)
    plt.close(fig)
    return path
