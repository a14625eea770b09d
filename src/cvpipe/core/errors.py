"""Exceptions that the CLI turns into one-line messages and exit codes.

* ``ParamsError`` and ``UsageError`` -> exit 2 (the user asked for something invalid)
* ``StageError`` -> exit 1 (the stage ran and failed)
"""

from __future__ import annotations

import reprlib
from typing import Any

MAX_VALUE_CHARS = 200  # a value quoted in an error message is cut here, saying how long it was
MAX_LINE_CHARS = 1000  # no line of a ParamsError is longer than this


def _bounded_repr() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset, r.maxfrozenset = 3, 8, 8, 8, 8, 8
    r.maxstring = r.maxother = r.maxlong = 60
    return r


_REPR = _bounded_repr()


def shorten(value: Any, limit: int = MAX_VALUE_CHARS) -> str:
    """``repr(value)`` for an error message: at most about *limit* characters, then how long the value was.

    ``shorten("x" * 10**5)`` -> ``'xxx...x'... (100,000 characters)``. The work is bounded too:
    a huge string is sliced before its repr, a huge container shows its first items only.
    """
    try:
        if isinstance(value, (str, bytes)):
            if len(value) <= limit and len(shown := repr(value)) <= limit:
                return shown
            return f"{repr(value[:limit])[:limit]}... ({len(value):,} characters)"
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 2 * limit:
            return f"an integer of {value.bit_length():,} bits"
        if isinstance(value, (list, tuple, dict, set, frozenset)):
            shown = _REPR.repr(value)
            if len(value) <= _REPR.maxlist and len(shown) <= limit:
                return shown  # nested levels may be elided as [...]
            return f"{shown[:limit]}{'...' if len(shown) > limit else ''} ({len(value):,} items)"
        shown = repr(value)
    except Exception:  # a repr that fails (or an int Python refuses to print) is not worth a crash
        return f"<{type(value).__name__}>"
    return shown if len(shown) <= limit else f"{shown[:limit]}... ({len(shown):,} characters)"


def clip(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """*text* cut at *limit* characters, saying how long it was (for keys and messages, not values)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


class CvpipeError(Exception):
    """Base class: an error with a message meant for the user."""

    exit_code = 1


class StageError(CvpipeError):
    """A stage could not complete (bad data, missing inputs, ...)."""

    exit_code = 1


class UsageError(CvpipeError):
    """The command line was wrong."""

    exit_code = 2


class ParamsError(UsageError):
    """params.yaml (or an override) is invalid. The message names the key path.

    Every line of the message is clipped to :data:`MAX_LINE_CHARS`, whatever value it quotes.
    """

    exit_code = 2

    def __init__(self, message: str = "") -> None:
        super().__init__("\n".join(clip(line, MAX_LINE_CHARS) for line in str(message).split("\n")))
