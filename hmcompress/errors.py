"""User-facing error types: the CLI turns each into one clear line and exit code 2."""
from __future__ import annotations

from hmcompress.runtime.errors import FormatError


class UserError(Exception):
    """Bad input or usage: reported as one line, never as a traceback."""


class CheckpointError(UserError):
    """A checkpoint cannot be read or holds something we refuse to touch."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class OptionError(UserError):
    """An option's value makes no sense. ``option`` is the library's name for it (``tol``,
    ``max_error``); the CLI shows the flag instead (``--tol``, ``--max-error``)."""

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"{option} {problem}")
        self.option = option
        self.problem = problem

    def __reduce__(self):  # worker processes send errors back pickled
        return OptionError, (self.option, self.problem)


class OutputExists(UserError):
    """An output file exists and the caller did not ask to overwrite it."""

    def __init__(self, path: object) -> None:
        super().__init__(f"{path}: exists (pass overwrite=True to replace it)")
        self.path = path

    def __reduce__(self):
        return OutputExists, (self.path,)


USER_ERRORS: tuple[type[Exception], ...] = (UserError, FormatError)

# What code of the user's (a factory, a data hook, the model itself) may raise that becomes one
# line of `UserError`: sys.exit() inside it is a failure of that code too, not the command's exit.
USER_CODE_FAILURES = (Exception, SystemExit)
