"""Errors a user can cause. The CLI prints them as one line, never a traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad config value, argument or path."""


class DataError(ValueError):
    """A problem with the data source as a whole (wrong path, missing column, no rows)."""


def first_line(exc: BaseException, with_type: bool = True) -> str:
    """`Type: first line of the message`, safe for exceptions whose message is empty."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if not with_type:
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
