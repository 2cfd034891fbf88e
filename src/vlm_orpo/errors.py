"""Errors a user can cause. The CLI prints them as one line, never a traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad config value, argument or path."""


class DataError(ValueError):
    """A problem with the data source as a whole (wrong path, missing column, no rows)."""


class BadRow(ValueError):
    """A problem with one row; the row is skipped and counted under `reason`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def first_line(exc: BaseException, with_type: bool = True) -> str:
    """`Type: first line of the message`, safe for exceptions whose message is empty."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if not with_type:
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class RunStopped(RuntimeError):
    """A run that stopped for a reason the user can act on (a non-finite loss, a full disk, Ctrl-C): one line,
    with what was kept and how to go on."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
