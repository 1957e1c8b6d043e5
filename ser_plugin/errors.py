"""The one error type of ser_plugin."""

from __future__ import annotations

__all__ = ["SERError"]


class SERError(Exception):
    """Raised for every misuse ser_plugin can detect.

    The message says what was wrong, the shapes involved and how to fix it. Catch this one type to
    handle any ser_plugin input error.
    """
