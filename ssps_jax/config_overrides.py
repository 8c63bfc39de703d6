"""Config files and `--config.a.b=value` overrides for the `ssps-jax` command.

Written here rather than with ml_collections' `config_flags` because that one
is built on absl flags: it would make `train`, `evaluate`, `demo` and the
benchmarks a second flag system beside the argparse of the other commands
(`--base_dir` next to `--base-dir`), with absl's help (`--helpfull`: every
flag of grain and TFDS) and chained tracebacks for a mistyped key. Here the
command line stays argparse, and every mistake is one `UsageError` whose
message names the key or the file.

The syntax is config_flags': `--config FILE`, where FILE is a Python file
whose `get_config()` returns a ConfigDict, and any number of
`--config.KEY=VALUE`. A value is read as the type of the value it replaces.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import traceback
from pathlib import Path

import ml_collections

_TRUE, _FALSE = ("true", "1"), ("false", "0")


class UsageError(Exception):
    """A command-line mistake (a config file, a key, a value); the message names it."""


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    """Runs FILE's `get_config()`; any failure is a UsageError naming FILE (and the line, if it raised)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_ssps_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        get_config = getattr(module, "get_config", None)
        if get_config is None:
            raise UsageError(f"{path} has no get_config()")
        config = get_config()
    except UsageError:
        raise
    except Exception as e:  # whatever the file does wrong, its author wants the line, not our traceback
        raise UsageError(f"{_where(path, e)}: {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise UsageError(f"{path}: get_config() returned a {type(config).__name__}, not an ml_collections ConfigDict")
    return config


def _where(path: Path, error: Exception) -> str:
    """`path:line` of the deepest frame of `error` in the config file (a SyntaxError has its own)."""
    if isinstance(error, SyntaxError) and error.lineno:
        return f"{path}:{error.lineno}"
    frames = traceback.extract_tb(error.__traceback__)
    lines = [f.lineno for f in frames if Path(f.filename).resolve() == path.resolve()]
    return f"{path}:{lines[-1]}" if lines else str(path)


def load(path: str | Path, overrides: list[tuple[str, str]]) -> ml_collections.ConfigDict:
    """The config of FILE with the overrides applied, locked (as config_flags does): no key can be added later."""
    config = apply_overrides(load_config_file(path), overrides)
    config.lock()
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[tuple[str, str]]) -> ml_collections.ConfigDict:
    """Sets each (dotted key, text) pair, in order, to the text read as the current value's type."""
    for key, text in overrides:
        parent, leaf = _parent(config, key)
        parent[leaf] = parse_value(f"config.{key}", text, parent[leaf], parent.get_type(leaf))
    return config


def _parent(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    """The section holding `key` and its last part; a UsageError (with the closest key) if there is none."""
    *sections, leaf = key.split(".")
    node = config
    for part in sections:
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        close = difflib.get_close_matches(key, dotted_keys(config), n=1)
        hint = f" (did you mean config.{close[0]}?)" if close else ""
        raise UsageError(f"config.{key}: no such key{hint}")
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise UsageError(f"config.{key}: is a section; override its keys (config.{key}.KEY=VALUE)")
    return node, leaf


def dotted_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every key of `config`, sections and values, as `a.b.c`."""
    keys = []
    for name, value in config.items():
        keys.append(prefix + name)
        if isinstance(value, ml_collections.ConfigDict):
            keys += dotted_keys(value, f"{prefix}{name}.")
    return keys


def parse_value(name: str, text: str, current, kind: type):
    """`text` as a value of `kind` (the type of `current`, or of its placeholder when it is None)."""

    def wrong(expected: str):
        return UsageError(f"{name}: expected {expected}, got {text!r}")

    if kind is bool:
        if text.lower() not in _TRUE + _FALSE:
            raise wrong("bool (true/false/1/0)")
        return text.lower() in _TRUE
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise wrong("int") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise wrong("float") from None
    if kind is str:
        return text
    if kind in (tuple, list):
        return kind(_sequence(name, text, current, wrong))
    if current is None:  # no type to go by: a Python literal if it is one, else the text
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    raise UsageError(f"{name}: a {kind.__name__} cannot be set from the command line")


def _sequence(name: str, text: str, current, wrong) -> list:
    """A tuple or list literal; its items must be of the current items' type (ints do for floats).

    A sequence of strings (or an empty one) also takes one bare item: `--config.eval.trials=list.txt`
    is `('list.txt',)`. A Python literal other than a string (`5`) is still refused for an empty one.
    """
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text if all(isinstance(item, str) for item in current) else None
        if value is None:
            raise wrong(f"a {type(current).__name__} literal such as {_example(current)}") from None
    if isinstance(value, str) and all(isinstance(item, str) for item in current):
        value = [value]
    if not isinstance(value, (tuple, list)):
        raise wrong(f"a {type(current).__name__} literal such as {_example(current)}")
    kinds = {type(item) for item in current}
    if len(kinds) == 1:  # a uniform sequence: keep it so (mixed or empty ones are not checked)
        (kind,) = kinds
        allowed = (int, float) if kind is float else (kind,)
        for item in value:
            if not isinstance(item, allowed) or (isinstance(item, bool) and kind is not bool):
                raise UsageError(f"{name}: expected items of type {kind.__name__}, got {item!r} in {text!r}")
    return list(value)


def _example(current) -> str:
    return repr(tuple(current)) if current else "('a', 'b')"
