"""`ssps-jax plot`: the curves and DET of a workdir, from the files training and evaluation write."""

import json

import matplotlib.image
import numpy as np
import pytest

from ssps_jax import cli, plot


def _workdir(tmp_path):
    """A workdir as a resumed run leaves it: step 2 logged twice (before and after the resume), two evaluations."""
    records = [
        {"kind": "train", "step": 1, "loss": 5.0, "lr": 1e-3, "samples_per_s": 10.0, "steps_per_s": 0.2},
        {"kind": "train", "step": 2, "loss": 4.5, "lr": 1e-3, "samples_per_s": 12.0, "steps_per_s": 0.3},
        {"kind": "train", "step": 2, "loss": 4.0, "lr": 1e-3, "samples_per_s": 14.0, "steps_per_s": 0.3},
        {"kind": "ssps", "step": 2, "nmi_speaker": 0.5, "kmeans_seconds": 1.0},
        {"kind": "train", "step": 3, "loss": 3.0, "lr": 5e-4, "samples_per_s": 15.0, "steps_per_s": 0.3},
        {
            "kind": "eval",
            "step": 3,
            "trials/cosine/eer": 0.3,
            "trials/as-norm/eer": 0.25,
            "trials/cosine/min_dcf_0.01": 0.9,
        },
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rng = np.random.default_rng(0)
    for step in (2, 10):
        folder = tmp_path / "eval" / f"step_{step}"
        folder.mkdir(parents=True)
        for suffix in ("", ".as-norm"):
            labels = rng.integers(0, 2, 40)
            lines = [f"{rng.normal(y):.6f} {y} a{i}.wav b{i}.wav\n" for i, y in enumerate(labels)]
            (folder / f"trials{suffix}.scores.txt").write_text("".join(lines))
    return tmp_path


def test_curves_keep_the_last_record_of_a_step_and_group_evaluations(tmp_path):
    panels = plot.curves(plot.read_metrics(_workdir(tmp_path)))
    assert panels["train loss"] == {"loss": ([1, 2, 3], [5.0, 4.0, 3.0])}  # the resumed run's step 2
    assert panels["eval eer"] == {"trials/cosine": ([3], [0.3]), "trials/as-norm": ([3], [0.25])}
    assert panels["eval min_dcf_0.01"] == {"trials/cosine": ([3], [0.9])}
    assert panels["ssps nmi_speaker"] == {"nmi_speaker": ([2], [0.5])}
    assert "train steps_per_s" not in panels and "train samples_per_s" in panels


def test_plot_command_writes_the_curves_and_the_newest_det(tmp_path, capsys):
    workdir = _workdir(tmp_path)
    step, runs = plot.last_evaluation(workdir)
    assert step == 10 and sorted(runs) == ["trials as-norm", "trials cosine"]
    rows = (workdir / "eval" / "step_10" / "trials.as-norm.scores.txt").read_text().split()
    np.testing.assert_allclose(runs["trials as-norm"][0][:2], [float(rows[0]), float(rows[4])])

    cli.main(["plot", str(workdir)])
    printed = capsys.readouterr().out.split()
    assert printed == [
        "wrote",
        str(workdir / "plots" / "training.png"),
        "wrote",
        str(workdir / "plots" / "det_step_10.png"),
    ]
    for name in ("training.png", "det_step_10.png"):
        image = matplotlib.image.imread(workdir / "plots" / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0  # drawn, not blank


def test_plot_of_an_empty_folder_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["plot", str(tmp_path)])
    assert "nothing to plot" in str(e.value)
