"""Every error that pipeline reports to a user.

The tree::

    PipelineError                 base: a message for a person and an exit code
    ├── UsageError        (2)     the job file, the command line or the input is wrong
    │   ├── JobFileError          one key of a job file: names the file, the key and the fix
    │   └── InputError            an input file: names the file, the row and the field
    ├── AuthError         (1)     the provider refused the API key (401/403): the job stops at once
    ├── StateError        (1)     the state folder cannot be used (unwritable, locked, disk full)
    └── ProviderError     (1)     the endpoint cannot serve the job at all

A request that fails is *not* an exception: it becomes a failed row with its reason.
Third-party errors are translated at the seam where they happen, with ``raise ... from exc``.
"""

from __future__ import annotations

from pathlib import Path

EXIT_OK = 0
EXIT_FAILED_TO_RUN = 1
EXIT_USAGE = 2
EXIT_ROWS_FAILED = 3
EXIT_OVER_BUDGET = 4
EXIT_INTERRUPTED = 130


class PipelineError(Exception):
    """Base class: ``str(error)`` is a complete message for a person."""

    exit_code: int = EXIT_FAILED_TO_RUN


class UsageError(PipelineError):
    """The job file, the command line or the input is wrong; nothing was sent."""

    exit_code = EXIT_USAGE


class JobFileError(UsageError):
    """One key of a job file is wrong."""

    def __init__(self, path: Path | str, key: str, problem: str, fix: str = "") -> None:
        self.path = str(path)
        self.key = key
        self.problem = problem
        self.fix = fix
        where = f"{self.path}: {key}" if key else self.path
        super().__init__(f"{where}: {problem}" + (f" {fix}" if fix else ""))


class InputError(UsageError):
    """An input file cannot be read as the job needs it."""

    def __init__(self, path: Path | str, problem: str, *, row: int | None = None) -> None:
        self.path = str(path)
        self.row = row
        where = self.path if row is None else f"{self.path}, row {row}"
        super().__init__(f"{where}: {problem}")


class AuthError(PipelineError):
    """The provider rejected the credentials; every further request would fail too."""


class StateError(PipelineError):
    """The job's state folder cannot be read or written."""


class ProviderError(PipelineError):
    """The endpoint cannot serve this job at all (for example it is unreachable)."""
