"""The parts of timm that older timm releases lack, looked up instead of imported.

spark-sparse is tested against the newest timm, but the machines SparK users train on (cluster and
GPU images) often hold an older one, where a class a converter names (``SimpleNorm``, ...) or a
module a model family is built from (``timm.models.cspnext``, ...) does not exist yet. Importing
them unconditionally made ``import spark_sparse`` fail on such a machine for every model. Here a
missing class is ``None`` (its converter is left out: no model of that timm can hold one), and
:mod:`spark_sparse.models` leaves out a family whose timm parts are missing, naming it and why.
"""
from __future__ import annotations

import importlib
import re
from typing import Any, Optional

import timm

__all__ = ["optional_timm_part", "present", "is_missing_timm_part", "describe_missing_timm_part", "timm_version"]


def optional_timm_part(module: str, name: str) -> Optional[Any]:
    """``module.name``, a class or a function (e.g. ``"timm.layers", "SimpleNorm"``), or ``None`` where this timm
    has no such thing."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def present(*classes: Optional[type]) -> tuple[type, ...]:
    """The classes this timm has, for ``isinstance`` checks naming some that only newer releases define."""
    return tuple(cls for cls in classes if cls is not None)


def is_missing_timm_part(error: ImportError) -> bool:
    """Whether ``error`` is timm lacking a module or a name (``from timm.x import Y``), not a bug of ours."""
    return (error.name or "").split(".")[0] == "timm"


def describe_missing_timm_part(error: ImportError) -> str:
    """``error``'s message without the file path Python appends (``cannot import name 'X' from 'timm.m'``)."""
    return re.sub(r" \([^()]*\)$", "", str(error))


def timm_version() -> str:
    return getattr(timm, "__version__", "unknown")
