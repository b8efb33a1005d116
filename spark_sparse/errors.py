"""The base class of every error a user can fix by changing what they asked for.

The CLI prints such an error as one line (its message names the thing and the fix) and exits with
status 1; any other exception is a bug or an environment failure and keeps its traceback. Each
error type also keeps its standard base (``ValueError``, ``TypeError``, ``RuntimeError``) so that
callers catching those go on working.
"""
from __future__ import annotations

__all__ = ["SparkSparseError", "ConfigError"]


class SparkSparseError(Exception):
    """A problem with the user's request, data, files or machine, explained with its fix in the message."""


class ConfigError(SparkSparseError, ValueError):
    """A combination of settings that cannot run (batch sizes, output folder, missing optional package)."""
