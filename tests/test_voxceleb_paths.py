"""VoxCeleb layouts: relative config paths follow data.base_dir, and make-csv leaves out trial-list speakers.

The pod command of docs/pods.md (`--config.data.base_dir=DATA` on a
VoxCeleb config) runs here against a fake layout built from the demo corpus;
training itself is replaced by a function that records the config it would
read its data with, and stops once config.json is written.
"""

import csv
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import SMALL_CORPUS

from data_pipelines.demo_corpus import corpus
from ssps_jax import cli
from ssps_jax import config as config_lib
from ssps_jax import train as train_lib

ROOT = Path(__file__).resolve().parents[1]
VOXCELEB_CONFIG = str(ROOT / "configs" / "simclr_ssps_ecapa.py")


class _Stop(Exception):
    """Raised in place of reading the data: the config is checked, nothing is trained."""


def _voxceleb_layout(demo_dir: Path, data: Path) -> Path:
    """<data>/ as docs/data.md "VoxCeleb from a manual download" lays it out, holding the demo corpus."""
    data.mkdir()
    for name in ("demo", "musan_split", "simulated_rirs"):
        (data / name).symlink_to(demo_dir / name)
    shutil.copy(demo_dir / corpus.TRAIN_CSV, data / "voxceleb2_train.csv")
    shutil.copy(demo_dir / corpus.TRIALS, data / "voxceleb1_test_O")
    return data


def _train(argv, monkeypatch) -> list:
    """Runs `ssps-jax train argv` with the data, model, evaluator, input pipeline and checkpoints faked, up to where
    config.json is written (after everything that can refuse the run); returns the config it read its data with."""
    used = []

    def load_source(config):
        used.append(config)
        return range(config.data.train_size)

    def save_then_stop(*args):
        save_config(*args)
        raise _Stop

    def no_checkpoints(directory, *args, **kwargs):
        directory.mkdir(parents=True)  # as orbax's manager makes it
        return SimpleNamespace(restore_newest=lambda *a, **k: None, close=lambda: None)

    save_config = train_lib.save_config
    monkeypatch.setattr(train_lib, "_load_source", load_source)
    monkeypatch.setattr(train_lib.input_pipeline, "train_labels", lambda data, size: None)
    monkeypatch.setattr(train_lib, "build", lambda *a, **k: (SimpleNamespace(steps_per_epoch=1, model=None), None))
    monkeypatch.setattr(train_lib.verification, "make_trial_evaluator", lambda *a: None)
    monkeypatch.setattr(train_lib.input_pipeline, "train_dataset", lambda *a, **k: None)
    monkeypatch.setattr(train_lib.input_pipeline, "make_iterator", lambda *a, **k: None)
    monkeypatch.setattr(train_lib.checkpoint, "Checkpointer", no_checkpoints)
    monkeypatch.setattr(train_lib, "save_config", save_then_stop)
    with pytest.raises(_Stop):
        cli.main(["train", *argv])
    return used


def test_readme_pod_command_moves_the_voxceleb_layout_with_base_dir(demo_dir, tmp_path, monkeypatch):
    data = _voxceleb_layout(demo_dir, tmp_path / "data")
    monkeypatch.chdir(tmp_path.parent)  # a working directory with no data/ in it
    (config,) = _train(
        ["--config", VOXCELEB_CONFIG, "--workdir", str(tmp_path / "w"), f"--config.data.base_dir={data}"],
        monkeypatch,
    )
    assert config.data.train_csv == str(data / "voxceleb2_train.csv")
    assert config.eval.trials == (str(data / "voxceleb1_test_O"),)
    # config.json keeps the paths as written: `evaluate` resolves them the same way.
    saved = train_lib.load_config(tmp_path / "w")
    assert (saved.data.train_csv, tuple(saved.eval.trials)) == ("voxceleb2_train.csv", ("voxceleb1_test_O",))


def test_missing_relative_path_is_reported_where_it_was_looked_for(demo_dir, tmp_path, monkeypatch, capsys):
    data = _voxceleb_layout(demo_dir, tmp_path / "data")
    (data / "voxceleb2_train.csv").unlink()
    argv = ["train", "--config", VOXCELEB_CONFIG, "--workdir", str(tmp_path / "w"), f"--config.data.base_dir={data}"]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"ssps-jax train: error: config.data.train_csv: file not found: {data / 'voxceleb2_train.csv'} "
        "('voxceleb2_train.csv' relative to data.base_dir)"
    )

    shutil.copy(demo_dir / corpus.TRAIN_CSV, data / "voxceleb2_train.csv")
    config = _voxceleb_config(data)
    config.eval.trials = ("voxceleb1_test_H",)
    with pytest.raises(
        config_lib.ConfigError, match=r"config.eval.trials\[0\]: file not found: .*data/voxceleb1_test_H"
    ):
        config_lib.validate(config)


def _voxceleb_config(base_dir: Path):
    config = config_lib.paper_ecapa_tdnn(config_lib.use_voxceleb(config_lib.base_config()))
    config.data.base_dir = str(base_dir)
    return config


def test_resolution_keeps_absolute_and_existing_relative_paths(demo_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo_data").symlink_to(demo_dir)
    demo = config_lib.use_demo(config_lib.base_config())  # demo_train.csv under base_dir demo_data
    config_lib.validate(demo)
    resolved = config_lib.resolve_paths(demo)
    assert resolved.data.train_csv == "demo_data/demo_train.csv"
    assert resolved.eval.trials == ("demo_data/demo_trials.txt",)
    assert demo.data.train_csv == "demo_train.csv"  # a copy: the config itself is unchanged
    # A path that exists as given is kept, not joined to base_dir again.
    demo.data.train_csv = "demo_data/demo_train.csv"
    assert config_lib.resolve_paths(demo).data.train_csv == "demo_data/demo_train.csv"

    # The demo configs follow data.base_dir: a corpus elsewhere, named once (README's tour).
    (tmp_path / "demo_data").unlink()
    moved = config_lib.use_demo(config_lib.base_config())
    moved.data.base_dir = str(demo_dir)
    config_lib.validate(moved)
    resolved = config_lib.resolve_paths(moved)
    assert resolved.data.train_csv == str(demo_dir / corpus.TRAIN_CSV)
    assert resolved.eval.trials == (str(demo_dir / corpus.TRIALS),)

    absolute = _voxceleb_config(tmp_path / "elsewhere")
    absolute.data.train_csv = str(demo_dir / corpus.TRAIN_CSV)
    absolute.data.augment.noise_dir = "noise"
    resolved = config_lib.resolve_paths(absolute)
    assert resolved.data.train_csv == str(demo_dir / corpus.TRAIN_CSV)
    assert resolved.data.augment.noise_dir == str(tmp_path / "elsewhere" / "noise")
    assert resolved.data.augment.rir_dir == ""  # "" keeps meaning <base_dir>/simulated_rirs
    assert resolved.eval.base_dir == ""


def _csv_speakers(path: Path) -> dict[str, str]:
    with path.open(newline="") as f:
        return {row["File"]: row["Speaker"] for row in csv.DictReader(f)}


def test_make_csv_excludes_the_speakers_of_trial_lists(demo_dir, tmp_path, capsys):
    # The same speakers with sslsv's voxceleb1/ prefix, in a second list: both spellings are read.
    prefixed = tmp_path / "prefixed_trials"
    prefixed.write_text(
        "".join(
            f"{label} voxceleb1/{enrol} voxceleb1/{test}\n"
            for label, enrol, test in (line.split() for line in (demo_dir / corpus.TRIALS).read_text().splitlines())
        )
    )
    out = tmp_path / "dev.csv"
    cli.main(["make-csv", str(demo_dir / "demo"), "--out", str(out), "--exclude-trials", str(demo_dir / corpus.TRIALS)])
    stdout = capsys.readouterr().out
    assert f"excluded {SMALL_CORPUS.test_speakers} speakers and " in stdout
    assert _csv_speakers(out) == _csv_speakers(demo_dir / corpus.TRAIN_CSV)  # exactly the train speakers

    again = tmp_path / "again.csv"
    cli.main(["make-csv", str(demo_dir / "demo"), "--out", str(again), "--exclude-trials", str(prefixed)])
    assert _csv_speakers(again) == _csv_speakers(out)


def test_make_csv_names_the_bad_trial_line(demo_dir, tmp_path):
    bad = tmp_path / "bad_trials"
    bad.write_text("1 id10001/a/1.wav id10001/b/2.wav\n0 id10001/a/1.wav 2.wav\n")
    with pytest.raises(SystemExit, match=r"line 2: field test: '2.wav' is not <speaker>/<session>/<utt>"):
        cli.main(["make-csv", str(demo_dir / "demo"), "--out", str(tmp_path / "x.csv"), "--exclude-trials", str(bad)])
