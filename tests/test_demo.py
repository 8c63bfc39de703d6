"""The demo table's rows: EER / minDCF with the bootstrap CIs the evaluation wrote, and the SSPS diagnostics."""

import json
import math
import re

from ssps_jax import demo


def _workdir(tmp_path, with_ci=True):
    records = [
        {"kind": "eval", "step": 0, "t/cosine/eer": 0.4, "t/cosine/min_dcf_0.01": 1.0},
        {"kind": "train", "step": 5, "ssps/coverage": 0.5, "ssps/same_speaker": 1.0, "ssps/same_session": 0.0},
        {"kind": "train", "step": 6, "ssps/coverage": 0.7, "ssps/same_speaker": 1.0, "ssps/same_session": 0.0},
        {"kind": "eval", "step": 6, "t/cosine/eer": 0.25, "t/cosine/min_dcf_0.01": 0.9},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for step, (eer, dcf) in {0: ([0.35, 0.45], [0.98, 1.0]), 6: ([0.2, 0.31], [0.85, 0.95])}.items():
        cosine = {"eer": 0.0, "min_dcf_0.01": 0.0}
        if with_ci:
            cosine.update({"eer_ci": eer, "min_dcf_0.01_ci": dcf})
        (tmp_path / "eval" / f"step_{step}").mkdir(parents=True)
        (tmp_path / "eval" / f"step_{step}" / "metrics.json").write_text(
            json.dumps({"results": {"t": {"cosine": cosine}}})
        )
    return tmp_path


def test_rows_carry_the_evaluations_confidence_intervals_and_the_table_prints_them(tmp_path, capsys):
    workdir = _workdir(tmp_path)
    last = demo._row(workdir, "t", -1, after_step=4)
    assert (last["eer"], last["eer_ci"], last["min_dcf_ci"]) == (0.25, [0.2, 0.31], [0.85, 0.95])
    assert last["coverage"] == 0.6 and last["same_speaker"] == 1.0
    first = demo._row(workdir, "t", 0)
    assert first["eer_ci"] == [0.35, 0.45] and first["step"] == 0
    demo._print({"untrained": first, "oracle": last}, "t", 0.1)
    out = capsys.readouterr().out
    assert re.search(r"oracle +6 +25\.00 +\[20\.00, 31\.00\] +0\.9000 +\[0\.8500, 0\.9500\] +60\.0 +100\.0 +0\.0", out)
    assert re.search(r"untrained +0 +40\.00 +\[35\.00, 45\.00\] +1\.0000 +\[0\.9800, 1\.0000\]", out)


def test_evaluations_without_intervals_print_none(tmp_path, capsys):
    row = demo._row(_workdir(tmp_path, with_ci=False), "t", -1)
    assert all(math.isnan(x) for x in row["eer_ci"] + row["min_dcf_ci"])
    demo._print({"old run": row}, "t", 0.0)
    assert "[" not in capsys.readouterr().out.split("old run")[1].splitlines()[0]
