"""The `ssps-jax` command line: help, flag spellings, config overrides, and one-line usage errors.

Commands run in this process through `cli.main`; where running the command
for real would train or benchmark, the library function it calls is replaced
by one that records its arguments.
"""

import argparse
from pathlib import Path

import ml_collections
import pytest

from ssps_jax import cli
from ssps_jax import config as config_lib
from ssps_jax.config_overrides import UsageError, apply_overrides, load_config_file

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = str(ROOT / "configs" / "demo_simclr.py")


def _exit(argv, capsys) -> tuple[object, str, str]:
    """main(argv)'s exit code, stdout and stderr."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def _usage_error(argv, capsys) -> str:
    """The one stderr line of a usage error (exit 2, nothing on stdout)."""
    code, out, err = _exit(argv, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and not out
    return err.strip()


@pytest.mark.parametrize(
    "command, flags",
    [
        ("train", ["--config FILE", "--workdir DIR", "--config.KEY=VALUE", "--verbose"]),
        ("evaluate", ["--workdir DIR", "--trials FILE", "--base-dir DIR", "--step"]),
        ("demo", ["--data DIR", "--workdir DIR", "--config FILE", "--config.KEY=VALUE"]),
        ("bench", ["--kmeans-n N", "--kmeans-k K", "--steps", "--warmup", "--batch", "--dtype", "--baseline"]),
        ("bench-input", ["--workers N,N,...", "--batches", "--against FILE", "--config.KEY=VALUE"]),
        ("prepare", ["--csv FILE", "--base-dir DIR", "--data-dir DIR", "--min-seconds", "--skip-bad"]),
        ("make-csv", ["--out FILE", "--base-dir DIR", "--ext"]),
        ("prepare-demo", ["--train-speakers", "--scale", "--workers"]),
        ("bench-ssps", ["--queue-dtype", "--iterations", "--neighbours"]),
    ],
)
def test_help_lists_the_commands_own_flags(command, flags, capsys):
    code, out, err = _exit([command, "--help"], capsys)
    assert code == 0, err
    assert out.startswith(f"usage: ssps-jax {command} ")
    for flag in flags:
        assert flag in out
    options = [w for w in out.split() if w.startswith("--") and not w.startswith("--config.")]
    assert not [w for w in options if "_" in w]  # dashes, never underscores
    assert "helpfull" not in out


def test_every_flag_of_every_command_has_help():
    """Walks every subparser: each of its arguments (flags and positionals) says what it is."""
    parser = cli._parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(commands.choices) >= 17
    missing = [
        f"{name} {'/'.join(action.option_strings) or action.dest}"
        for name, command in commands.choices.items()
        for action in command._actions
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert not missing
    helped = {a.dest for a in commands._choices_actions if a.help}
    assert helped == set(commands.choices)


def test_top_level_help_lists_every_command(capsys):
    code, out, _ = _exit(["--help"], capsys)
    assert code == 0
    for command in ("train", "evaluate", "demo", "bench", "bench-input", "prepare-demo", "make-csv", "prepare"):
        assert f"    {command} " in out or f"    {command}\n" in out


def test_train_help_lists_the_config_sections_of_base_config(capsys, monkeypatch):
    _, out, _ = _exit(["train", "--help"], capsys)
    sections = out[out.index("config sections") :]
    assert "ssps_jax/config.py" in sections.splitlines()[0]
    lines = [line.split()[0] for line in sections.splitlines()[1:] if line.startswith("  ") and line.strip()]
    assert set(config_lib.base_config().keys()) <= set(lines)
    assert lines[:4] == ["seed", "method", "simclr", "dino"]  # the order of a config file, not alphabetical

    # A new section is listed (with its keys) without touching the CLI.
    base_config = config_lib.base_config

    def with_new_section():
        c = base_config()
        c.mixup = {"alpha": 0.2, "enabled": False}
        return c

    monkeypatch.setattr(config_lib, "base_config", with_new_section)
    _, out, _ = _exit(["train", "--help"], capsys)
    assert any(line.split()[:3] == ["mixup", "keys:", "alpha,"] for line in out.splitlines() if line.strip())


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.epoch=3", "config.train.epoch: no such key (did you mean config.train.epochs?)"),
        ("--config.trian.epochs=3", "config.trian.epochs: no such key (did you mean config.train.epochs?)"),
        ("--config.train.epochs=abc", "config.train.epochs: expected int, got 'abc'"),
        ("--config.ssps.enabled=yes", "config.ssps.enabled: expected bool (true/false/1/0), got 'yes'"),
        ("--config.model=3", "config.model: is a section"),
    ],
)
def test_config_override_mistakes_are_one_line(override, message, tmp_path, capsys):
    line = _usage_error(["train", "--config", DEMO_CONFIG, "--workdir", str(tmp_path / "w"), override], capsys)
    assert line.startswith("ssps-jax train: error: ")
    assert message in line
    assert not (tmp_path / "w").exists()


def test_config_file_mistakes_are_one_line(tmp_path, capsys):
    workdir = str(tmp_path / "w")
    line = _usage_error(["train", "--config", str(tmp_path / "nope.py"), "--workdir", workdir], capsys)
    assert line == f"ssps-jax train: error: config file not found: {tmp_path / 'nope.py'}"

    broken = tmp_path / "broken.py"
    broken.write_text("import ml_collections\n\n\ndef get_config():\n    return 1 / 0\n")
    line = _usage_error(["train", "--config", str(broken), "--workdir", workdir], capsys)
    assert line == f"ssps-jax train: error: {broken}:5: ZeroDivisionError: division by zero"

    broken.write_text("def get_config(:\n")
    assert f"{broken}:1: SyntaxError" in _usage_error(["demo", f"--config={broken}"], capsys)

    broken.write_text("CONFIG = 1\n")
    assert _usage_error(["bench", "--config", str(broken)], capsys).endswith(f"{broken} has no get_config()")

    broken.write_text("def get_config():\n    return {'seed': 0}\n")
    assert "not an ml_collections ConfigDict" in _usage_error(["bench-input", "--config", str(broken)], capsys)


def test_missing_paths_given_on_the_command_line_are_one_line(tmp_path, capsys):
    missing = tmp_path / "missing"
    line = _usage_error(["evaluate", "--workdir", str(missing)], capsys)
    assert line == f"ssps-jax evaluate: error: --workdir: folder not found: {missing}"
    # Trial lists are looked for where the workdir's config resolves them: under its data.base_dir.
    config = config_lib.base_config()
    config.data.base_dir = str(tmp_path)
    (tmp_path / "config.json").write_text(config.to_json())
    line = _usage_error(["evaluate", "--workdir", str(tmp_path), "--trials", str(missing)], capsys)
    assert line == f"ssps-jax evaluate: error: --trials: file not found: {missing}"
    line = _usage_error(["evaluate", "--workdir", str(tmp_path), "--trials", "voxceleb1_test_E"], capsys)
    assert line == (
        f"ssps-jax evaluate: error: --trials: file not found: {tmp_path / 'voxceleb1_test_E'} "
        "('voxceleb1_test_E' relative to data.base_dir)"
    )
    line = _usage_error(["prepare", "--csv", str(missing), "--base-dir", str(tmp_path)], capsys)
    assert line == f"ssps-jax prepare: error: --csv: file not found: {missing}"
    line = _usage_error(["make-csv", str(missing), "--out", str(tmp_path / "x.csv")], capsys)
    assert line == f"ssps-jax make-csv: error: ROOT: folder not found: {missing}"


def test_argparse_usage_errors_exit_2(tmp_path, capsys):
    for argv in (
        ["train", "--workdir", str(tmp_path)],  # --config is required
        ["train", "--config", DEMO_CONFIG, "--workdir", str(tmp_path), "--bogus"],
        ["train", "--config", DEMO_CONFIG, "--workdir", str(tmp_path), "--config.train.epochs"],  # no value
        ["prepare", "--csv", "x.csv", "--base-dir", ".", "--config.seed=1"],  # prepare takes no config
        ["bench", "--kmeans_n", "5"],  # the old spelling
        ["bench-input", "--workers", "0,a"],
    ):
        code, _, err = _exit(argv, capsys)
        assert code == 2, argv
        assert err.splitlines()[-1].startswith(f"ssps-jax {argv[0]}: error: "), argv


def test_invalid_config_values_are_one_line_exit_2(tmp_path, capsys):
    """ConfigError, raised by config.validate inside train: a usage error too."""
    argv = ["train", "--config", DEMO_CONFIG, "--workdir", str(tmp_path / "w"), "--config.train.global_batch_size=0"]
    line = _usage_error(argv, capsys)
    assert line == "ssps-jax train: error: config.train.global_batch_size: must be >= 1, got 0"
    assert not (tmp_path / "w").exists()


def test_bad_input_and_lost_runs_are_one_line_exit_1(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    code, _, err = _exit(["make-csv", str(tmp_path / "empty"), "--out", str(tmp_path / "x.csv")], capsys)
    assert code == "error: no <speaker>/<session>/*.wav file under " + str(tmp_path / "empty")
    assert "Traceback" not in err

    from ssps_jax import train as train_lib

    def lost(config, workdir):
        raise train_lib.NonFiniteLossError("loss is nan at step 3")

    monkeypatch.setattr(train_lib, "train", lost)
    code, _, _ = _exit(["train", "--config", DEMO_CONFIG, "--workdir", str(tmp_path / "w")], capsys)
    assert code == "error: loss is nan at step 3"  # SystemExit(str): printed to stderr, exit status 1


def _record(monkeypatch, module, name) -> list:
    """Replaces module.name by a function that records its arguments."""
    calls = []
    monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append((args, kwargs)))
    return calls


def test_train_gets_the_overridden_locked_config(tmp_path, monkeypatch):
    from ssps_jax import distributed
    from ssps_jax import train as train_lib

    _record(monkeypatch, distributed, "initialize")
    calls = _record(monkeypatch, train_lib, "train")
    cli.main(
        [
            "train",
            f"--config={DEMO_CONFIG}",
            "--workdir",
            str(tmp_path),
            "--config.train.epochs",
            "7",
            "--config.ssps.enabled=TRUE",
            "--config.optim.learning_rate=2e-3",
            "--config.data.base_dir=/data",
            "--config.model.ecapa_tdnn.channels=(64, 64, 64, 64, 192)",
        ]
    )
    [((config, workdir), _)] = calls
    assert workdir == str(tmp_path)
    assert config.train.epochs == 7 and config.ssps.enabled is True and config.optim.learning_rate == 2e-3
    assert config.data.base_dir == "/data"
    assert config.model.ecapa_tdnn.channels == (64, 64, 64, 64, 192)
    with pytest.raises(AttributeError):  # locked, as config_flags left it: a misspelt key cannot be added later
        config.train.epoch = 3


def test_commands_pass_their_flags_to_the_library(tmp_path, monkeypatch):
    from ssps_jax import distributed
    from ssps_jax import evaluate as evaluate_lib
    from ssps_jax.bench import input as bench_input
    from ssps_jax.bench import train as bench_train

    _record(monkeypatch, distributed, "initialize")
    calls = _record(monkeypatch, bench_train, "main")
    sizes = ["--kmeans-n", "480", "--kmeans-k", "12", "--dtype", "bfloat16", "--bytes-by-op", "5"]
    cli.main(["bench", "--config", DEMO_CONFIG, *sizes])
    [((config,), kwargs)] = calls
    assert config.train.epochs == 12  # demo_simclr's
    assert kwargs == dict(
        steps=20,
        warmup=3,
        batch=None,
        dtype="bfloat16",
        kmeans_n=480,
        kmeans_k=12,
        json_path=None,
        baseline=None,
        bytes_by_op=5,
    )

    calls = _record(monkeypatch, bench_input, "main")
    cli.main(["bench-input", "--config", DEMO_CONFIG, "--workers", "0,2", "--config.data.workers=3"])
    [((config, workers, batches, json_path, against), _)] = calls
    assert (config.data.workers, workers, batches, json_path, against) == (3, [0, 2], 20, None, None)

    trials = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for t in trials:
        t.write_text("")
    calls = _record(monkeypatch, evaluate_lib, "evaluate")
    argv = ["evaluate", "--workdir", str(tmp_path), "--trials", str(trials[0]), "--trials", str(trials[1])]
    cli.main([*argv, "--base-dir", str(tmp_path), "--step", "5"])
    assert calls == [((str(tmp_path), [str(t) for t in trials], str(tmp_path), 5), {})]


# apply_overrides: values read as the type of the value they replace.


def _config():
    return ml_collections.ConfigDict(
        {
            "seed": 0,
            "lr": 1e-3,
            "on": False,
            "name": "adam",
            "path": ml_collections.config_dict.placeholder(str),
            "sizes": (512, 1536),
            "ranges": (0.0, 15.0),
            "trials": (),
            "names": ("a.txt", "b.txt"),
            "free": None,
            "section": {"deep": {"key": 1}},
        }
    )


@pytest.mark.parametrize(
    "key, text, value",
    [
        ("seed", "42", 42),
        ("seed", "-1", -1),
        ("lr", "2e-4", 2e-4),
        ("lr", "3", 3.0),  # an int does for a float
        ("on", "true", True),
        ("on", "True", True),
        ("on", "1", True),
        ("on", "FALSE", False),
        ("on", "0", False),
        ("name", "sgd", "sgd"),
        ("name", "1", "1"),  # a str stays a str
        ("path", "/data", "/data"),  # a placeholder: the type it was declared with
        ("sizes", "(128, 384)", (128, 384)),
        ("sizes", "[1, 2, 3]", (1, 2, 3)),  # a list literal for a tuple: stays a tuple
        ("ranges", "(5, 7.5)", (5, 7.5)),
        ("trials", "('a.txt', 'b.txt')", ("a.txt", "b.txt")),
        ("trials", "demo_trials.txt", ("demo_trials.txt",)),  # one path for a sequence of paths
        ("trials", "'a b.txt'", ("a b.txt",)),
        ("names", "c.txt", ("c.txt",)),
        ("free", "[1, 2]", [1, 2]),  # no type to go by: a Python literal ...
        ("free", "abc", "abc"),  # ... or the text
        ("section.deep.key", "2", 2),
    ],
)
def test_apply_overrides_parses_values_by_the_current_type(key, text, value):
    config = apply_overrides(_config(), [(key, text)])
    got = config
    for part in key.split("."):
        got = got[part]
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    "key, text, message",
    [
        ("seed", "1.5", "config.seed: expected int, got '1.5'"),
        ("lr", "fast", "config.lr: expected float, got 'fast'"),
        ("on", "yes", "config.on: expected bool (true/false/1/0), got 'yes'"),
        ("sizes", "512", "config.sizes: expected a tuple literal such as (512, 1536), got '512'"),
        ("sizes", "abc", "config.sizes: expected a tuple literal such as (512, 1536), got 'abc'"),
        ("trials", "5", "config.trials: expected a tuple literal such as ('a', 'b'), got '5'"),
        ("sizes", "(1, 'a')", "config.sizes: expected items of type int, got 'a' in \"(1, 'a')\""),
        ("sizes", "(1, 2.5)", "config.sizes: expected items of type int, got 2.5"),
        ("sizes", "(1, True)", "config.sizes: expected items of type int, got True"),
        ("seeds", "1", "config.seeds: no such key (did you mean config.seed?)"),
        ("section.deep.kye", "1", "config.section.deep.kye: no such key (did you mean config.section.deep.key?)"),
        ("section.deep", "1", "config.section.deep: is a section"),
        ("zzzzzz", "1", "config.zzzzzz: no such key"),
    ],
)
def test_apply_overrides_names_the_key_of_a_mistake(key, text, message):
    with pytest.raises(UsageError) as e:
        apply_overrides(_config(), [(key, text)])
    assert str(e.value).startswith(message)
    assert "did you mean" not in message or str(e.value) == message


def test_overrides_apply_in_order_and_the_config_files_load():
    config = apply_overrides(_config(), [("seed", "1"), ("seed", "2")])
    assert config.seed == 2
    for path in sorted((ROOT / "configs").glob("*.py")):
        assert isinstance(load_config_file(path), ml_collections.ConfigDict), path
