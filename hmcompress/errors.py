"""User-facing error types: the CLI turns each into one clear line and exit code 2."""
from __future__ import annotations

from hmcompress.runtime import FormatError


class UserError(Exception):
    """Bad input or usage: reported as one line, never as a traceback."""


class CheckpointError(UserError):
    """A checkpoint cannot be read or holds something we refuse to touch."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class OptionError(UserError):
    """An option or combination of options makes no sense."""


USER_ERRORS: tuple[type[Exception], ...] = (UserError, FormatError)
