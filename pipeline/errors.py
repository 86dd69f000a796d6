"""Errors a user can cause: the CLI prints them as one line and exits non-zero, no traceback."""


class UserError(Exception):
    """Something the user can fix: a bad path, flag, file or setting. The message says what to do."""


class DataProblem(UserError):
    """One defect in a data set (missing file, corrupt image, bad mask, ...).

    ``kind`` groups defects for `conformalsam data check`, which collects them all instead of
    stopping at the first.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def describe(exc: BaseException) -> str:
    """'Type: first line of the message', for a one-line error that wraps someone else's exception."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0].strip() if lines else ''}".rstrip(": ")
