"""Kernel registry and per-layer dispatch (``register_kernel``, ``get_kernel``, ``list_kernels``)."""
from __future__ import annotations

import difflib
import warnings
from importlib.metadata import entry_points
from typing import Iterable, Type

from ..errors import SparkSparseError
from .base import ConvSpec, SparseConvKernel

__all__ = ["register_kernel", "get_kernel", "list_kernels", "select_kernel", "load_kernel_plugins",
           "check_kernel_names", "NoKernelError", "UnknownKernelError"]

#: entry-point group through which other packages register kernels
PLUGIN_GROUP = "spark_sparse.kernels"

_KERNELS: dict[str, Type[SparseConvKernel]] = {}
_INSTANCES: dict[str, SparseConvKernel] = {}
#: entry-point name -> why that plugin failed to load; a name asked for later is answered with the cause
_FAILED_PLUGINS: dict[str, str] = {}


class NoKernelError(SparkSparseError, RuntimeError):
    pass


class UnknownKernelError(SparkSparseError, KeyError):
    """A kernel name that is not registered (a typo, or a plugin that was not imported)."""

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument: the CLI's one-line message would come out quoted
        return str(self.args[0]) if self.args else ""


def register_kernel(cls: Type[SparseConvKernel]) -> Type[SparseConvKernel]:
    """Class decorator: make ``cls`` dispatchable by its ``NAME``.

    A class with the same module and qualified name as the registered one replaces it: that is the same
    kernel defined again (a re-run notebook cell, a reloaded module), not a second kernel claiming the name.
    """
    name = getattr(cls, "NAME", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"a kernel class needs NAME, the non-empty string it is registered and chosen by "
                        f"(e.g. NAME = \"mykernel\"); {cls.__module__}.{cls.__qualname__} has NAME={name!r}")
    registered = _KERNELS.get(name)
    if registered is not None and registered is not cls:
        if (registered.__module__, registered.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"kernel {name!r} is already registered by {registered.__module__}."
                             f"{registered.__qualname__}; give {cls.__qualname__} another NAME")
        _INSTANCES.pop(name, None)          # the old definition's instance must not keep serving the name
    _KERNELS[name] = cls
    return cls


def check_kernel_names(names: Iterable[str]) -> None:
    """Refuse names that are not registered, with the closest registered ones.

    Registered-but-unavailable kernels (spconv, MinkowskiEngine, triton without their library) pass: dispatch
    skips them with the reason, as it always has; only a name nothing registered (a typo) is an error here,
    since dispatch would skip it silently.
    """
    unknown = [name for name in names if name not in _KERNELS]
    if not unknown:
        return
    broken = [name for name in unknown if name in _FAILED_PLUGINS]
    if broken:
        raise UnknownKernelError("; ".join(
            f"kernel {name!r} is not registered: its plugin {_FAILED_PLUGINS[name]}" for name in broken)
            + "; fix that error (importing the plugin's module alone shows it) and run again")
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, list(_KERNELS), n=3)
        hints.append(f"{name!r}" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""))
    raise UnknownKernelError(f"unknown kernel{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; registered "
                             f"kernels: {', '.join(sorted(_KERNELS))}")


def load_kernel_plugins() -> list[str]:
    """Import every kernel plugin of :data:`PLUGIN_GROUP`; return the names of those that failed.

    A broken plugin must not break the package: it is skipped with a warning naming it and the error, and the
    error is kept so that asking for the kernel by its entry-point name later says why it is missing (a warning
    at import time scrolls away long before the run that names the kernel).
    """
    failed = []
    for entry in entry_points(group=PLUGIN_GROUP):
        try:
            entry.load()
        except Exception as exc:
            failed.append(entry.name)
            cause = f"{entry.value} failed to load when spark_sparse was imported: {type(exc).__name__}: {exc}"
            _FAILED_PLUGINS[entry.name] = cause
            warnings.warn(f"kernel plugin {entry.name!r} ({entry.value}) failed to load and is skipped: "
                          f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
        else:
            _FAILED_PLUGINS.pop(entry.name, None)
    return failed


def list_kernels() -> dict[str, Type[SparseConvKernel]]:
    return dict(_KERNELS)


def get_kernel(name: str) -> SparseConvKernel:
    """The (stateless, shared) instance of kernel ``name``."""
    check_kernel_names((name,))
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
