"""Errors that reach the user. Each one says what is wrong, shows the value and says how to fix it."""

from __future__ import annotations

import contextlib
import contextvars

__all__ = ["BrittleError", "UsageError", "InputError", "ResumeMismatchError", "arg", "command_line"]

_INTERFACE = contextvars.ContextVar("brittle_interface", default="python")
# Python argument names whose command-line option is not simply --name-with-dashes.
_CLI_NAMES = {"source": "--data", "config": "--config", "other_models": "--other-model"}
# Options that the Python API takes inside the config rather than as arguments.
_CONFIG_KEYS = {"weights": "[model] weights", "factory_kwargs": "[model] factory_kwargs", "bounds": "[model] bounds",
                "mean": "[model] mean", "std": "[model] std", "label_column": "[data] label_column",
                "device": "[model] device"}


@contextlib.contextmanager
def command_line():
    """Inside this block, messages name command-line options (the CLI enters it); outside, Python arguments."""
    token = _INTERFACE.set("cli")
    try:
        yield
    finally:
        _INTERFACE.reset(token)


def arg(name: str, python_value: str | None = None) -> str:
    """How the caller names an argument: `--train-data` on the command line, `train_data` (or
    `resume=True`, given python_value="True") from Python. Messages speak the caller's language."""
    if _INTERFACE.get() == "cli":
        return _CLI_NAMES.get(name, "--" + name.replace("_", "-"))
    if name in _CONFIG_KEYS:
        return f"config {_CONFIG_KEYS[name]}"
    return f"{name}={python_value}" if python_value is not None else name


class BrittleError(Exception):
    """Base class for errors caused by what the user gave (CLI exit code 2)."""

    exit_code = 2


class UsageError(BrittleError):
    """A bad option, configuration value or combination of arguments."""


class InputError(BrittleError):
    """A model or data file that cannot be used as given."""

    def __init__(self, path: object, problem: str, fix: str | None = None):
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        text = f"{self.path}: {problem}"
        if fix:
            text += f"\n  fix: {fix}"
        super().__init__(text)


class ResumeMismatchError(UsageError):
    """The output folder holds a run made with a different model, data, config or version."""
