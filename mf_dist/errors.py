"""The errors a user of mf-dist sees.

Every failure a user can act on is one of these types; the CLI prints the
message as one line and exits non-zero, never with a traceback.
"""

from __future__ import annotations


class MfDistError(Exception):
    """Base class of every error mf-dist raises on purpose."""


class ConfigError(MfDistError):
    """The run configuration (file or flags) is invalid."""


class InputError(MfDistError):
    """The input ratings cannot be used.

    The message names the file, the column and the offending row or value.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        column: str | None = None,
        row: int | None = None,
        value: object = None,
    ) -> None:
        where = []
        if file is not None:
            where.append(file)
        if column is not None:
            where.append(f"column {column!r}")
        if row is not None:
            where.append(f"row {row}")
        prefix = ", ".join(where) + ": " if where else ""
        suffix = f" (value: {value!r})" if value is not None else ""
        super().__init__(f"{prefix}{message}{suffix}")
        self.file = file
        self.column = column
        self.row = row
        self.value = value

    def __reduce__(self) -> tuple[object, ...]:
        # Errors raised on Dask workers travel back by pickle; keep the message
        # exactly as formatted there rather than formatting it again.
        return (_rebuild_input_error, (self.args[0], self.file, self.column, self.row, self.value))


class TrainingError(MfDistError):
    """Training cannot go on (for example the loss became non-finite)."""


class OutputError(MfDistError):
    """The output location cannot be written or published."""


class NotFoundError(MfDistError):
    """An id or table that was asked for is not in the published output."""


def _rebuild_input_error(
    message: str, file: str | None, column: str | None, row: int | None, value: object
) -> InputError:
    error = InputError.__new__(InputError)
    Exception.__init__(error, message)
    error.file, error.column, error.row, error.value = file, column, row, value
    return error
