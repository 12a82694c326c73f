"""Errors that reach the user. Each one says what is wrong, shows the value and says how to fix it."""

from __future__ import annotations

__all__ = ["BrittleError", "UsageError", "InputError", "ResumeMismatchError"]


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
