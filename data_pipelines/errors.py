"""Errors that mean "the input is wrong", as opposed to a bug.

Commands print these as one clear message (which names the file, line, field
or value) instead of a traceback.
"""


class InputError(ValueError):
    """Bad user input: a file, a config value, a command-line argument."""


class ConfigError(InputError):
    """An invalid configuration value; the message names the key (`config.train.epochs: ...`)."""
