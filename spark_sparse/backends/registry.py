"""Backend registry: ``register_backend``, ``create_backend``, ``list_backends`` (timm's shape).

A backend turns a dense encoder into one that runs on a :class:`~spark_sparse.features.FeatureMap`
representation. Availability is a property of the machine (is spconv importable?), so every
backend reports it with a reason instead of failing at import time.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Type

from ..errors import SparkSparseError
from ..features import FeatureMap
from .base import Backend

__all__ = ["BackendInfo", "register_backend", "create_backend", "list_backends", "get_backend_class",
           "UnknownBackendError", "RECOMMENDED_SPARSE_BACKENDS"]

_BACKENDS: dict[str, Type[Backend]] = {}

#: Preference order for "the recommended true-sparse backend" (``--sparse_conv=1``).
RECOMMENDED_SPARSE_BACKENDS = ("sparse", "spconv", "minkowski")


class UnknownBackendError(SparkSparseError, ValueError):
    pass


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str
    description: str

    def __str__(self) -> str:
        state = "available" if self.available else f"unavailable: {self.reason}"
        return f"{self.name:<10} {state}  ({self.description})"


def register_backend(cls: Type[Backend]) -> Type[Backend]:
    """Class decorator: make ``cls`` creatable by its ``name``.

    A backend is checked here for what every model needs of it (a name, the feature map type its modules
    consume, converters), so that a bare ``Backend`` subclass fails at registration, not inside a model's build."""
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"register_backend takes a Backend subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    feature_type = getattr(cls, "feature_type", None)
    if not isinstance(name, str) or not name or not (isinstance(feature_type, type) and issubclass(feature_type,
                                                                                                  FeatureMap)):
        raise TypeError(f"backend class {cls.__qualname__} needs a non-empty `name` and a `feature_type` (MaskedDense "
                        f"or SparseRows) with its converters: subclass a working backend instead (e.g. "
                        f"spark_sparse.backends.sparse.SparseBackend) and change what differs")
    if cls.name in _BACKENDS and _BACKENDS[cls.name] is not cls:
        raise ValueError(f"backend {cls.name!r} is already registered by {_BACKENDS[cls.name].__qualname__}")
    _BACKENDS[cls.name] = cls
    return cls


def list_backends() -> list[BackendInfo]:
    """Every registered backend with its availability on this machine and the reason when not."""
    infos = []
    for name, cls in _BACKENDS.items():
        available, reason = cls.availability()
        infos.append(BackendInfo(name, available, reason, cls.description))
    return infos


def _describe_all() -> str:
    return "\n".join(f"  {info}" for info in list_backends())


def get_backend_class(name: str) -> Type[Backend]:
    if name not in _BACKENDS:
        close = difflib.get_close_matches(name, list(_BACKENDS), n=3)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise UnknownBackendError(f"unknown backend {name!r}{hint}; registered backends:\n{_describe_all()}")
    return _BACKENDS[name]


def create_backend(name: str, **options) -> Backend:
    """Instantiate a backend by name; unknown or unavailable names fail listing every backend."""
    cls = get_backend_class(name)
    available, reason = cls.availability()
    if not available:
        raise UnknownBackendError(f"backend {name!r} is not available here: {reason}\nall backends:\n{_describe_all()}")
    return cls(**options)


def recommended_sparse_backend() -> str:
    """The first available true-sparse backend in :data:`RECOMMENDED_SPARSE_BACKENDS`."""
    for name in RECOMMENDED_SPARSE_BACKENDS:
        if name in _BACKENDS and _BACKENDS[name].availability()[0]:
            return name
    raise UnknownBackendError(f"no true-sparse backend is available; backends:\n{_describe_all()}")
