"""Kernel registry and per-layer dispatch (``register_kernel``, ``get_kernel``, ``list_kernels``)."""
from __future__ import annotations

import warnings
from importlib.metadata import entry_points
from typing import Iterable, Type

from ..errors import SparkSparseError
from .base import ConvSpec, SparseConvKernel

__all__ = ["register_kernel", "get_kernel", "list_kernels", "select_kernel", "load_kernel_plugins", "NoKernelError",
           "UnknownKernelError"]

#: entry-point group through which other packages register kernels
PLUGIN_GROUP = "spark_sparse.kernels"

_KERNELS: dict[str, Type[SparseConvKernel]] = {}
_INSTANCES: dict[str, SparseConvKernel] = {}


class NoKernelError(SparkSparseError, RuntimeError):
    pass


class UnknownKernelError(KeyError):
    pass


def register_kernel(cls: Type[SparseConvKernel]) -> Type[SparseConvKernel]:
    if cls.NAME in _KERNELS and _KERNELS[cls.NAME] is not cls:
        raise ValueError(f"kernel {cls.NAME!r} is already registered by {_KERNELS[cls.NAME].__qualname__}")
    _KERNELS[cls.NAME] = cls
    return cls


def load_kernel_plugins() -> list[str]:
    """Import every kernel plugin of :data:`PLUGIN_GROUP`; return the names of those that failed.

    A broken plugin must not break the package: it is skipped with a warning naming it and the error.
    """
    failed = []
    for entry in entry_points(group=PLUGIN_GROUP):
        try:
            entry.load()
        except Exception as exc:
            failed.append(entry.name)
            warnings.warn(f"kernel plugin {entry.name!r} ({entry.value}) failed to load and is skipped: "
                          f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
    return failed


def list_kernels() -> dict[str, Type[SparseConvKernel]]:
    return dict(_KERNELS)


def get_kernel(name: str) -> SparseConvKernel:
    """The (stateless, shared) instance of kernel ``name``."""
    if name not in _KERNELS:
        raise UnknownKernelError(f"unknown kernel {name!r}; registered: {', '.join(sorted(_KERNELS))}")
    if name not in _INSTANCES:
        _INSTANCES[name] = _KERNELS[name]()
    return _INSTANCES[name]


def select_kernel(spec: ConvSpec, priority: Iterable[str], layer: str, strict: bool = False
                  ) -> tuple[SparseConvKernel, dict[str, list[str]]]:
    """The first kernel in ``priority`` that supports ``spec``, and the reasons of those skipped.

    With ``strict``, anything but the first kernel is an error naming the layer and every reason.
    """
    priority = list(priority)
    rejected: dict[str, list[str]] = {}
    for name in priority:
        if name not in _KERNELS:
            rejected[name] = ["not registered"]
            continue
        reasons = _KERNELS[name].not_supported_reasons(spec)
        if not reasons:
            if strict and rejected:
                break
            return get_kernel(name), rejected
        rejected[name] = reasons
    detail = "; ".join(f"{name}: {', '.join(r)}" for name, r in rejected.items())
    if strict and len(rejected) < len(priority):
        raise NoKernelError(f"layer {layer} ({spec.describe()}, {spec.device_type}, {str(spec.dtype).replace('torch.', '')}) "
                            f"cannot run on {priority[0]!r} and --strict-backend forbids falling back: {detail}. "
                        f"Use a backend whose first kernel supports it (e.g. --backend=torch) or drop --strict-backend")
    raise NoKernelError(f"no kernel can run layer {layer} ({spec.describe()}, {spec.device_type}, "
                        f"{str(spec.dtype).replace('torch.', '')}): {detail}")
