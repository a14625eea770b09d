"""Exceptions that the CLI turns into one-line messages and exit codes.

* ``ParamsError`` and ``UsageError`` -> exit 2 (the user asked for something invalid)
* ``StageError`` -> exit 1 (the stage ran and failed)
"""

from __future__ import annotations


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
    """params.yaml (or an override) is invalid. The message names the key path."""

    exit_code = 2
