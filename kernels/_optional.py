"""Third-party kernel libraries, imported the first time a backend asks for them.

``import spark_sparse`` must not import spconv or MinkowskiEngine (slow, and a broken CUDA build
must not break the package): each library is an :class:`OptionalLibrary` whose import runs on first
use, and whose failure is kept as a reason in words for ``list_backends()`` and the kernel plan.
"""
from __future__ import annotations

from typing import Any, Callable

__all__ = ["OptionalLibrary"]


class OptionalLibrary:
    """``importer()`` run once, on demand; its result or the reason it failed, remembered."""

    def __init__(self, name: str, importer: Callable[[], Any], install_hint: str):
        self.name, self._importer, self._install_hint = name, importer, install_hint
        self._loaded = False
        self._module: Any = None
        self._error = ""

    def _load(self) -> None:
        if self._loaded:
            return
        try:
            self._module = self._importer()
        except Exception as exc:   # missing package, or a build that cannot load on this machine
            self._error = f"{self.name} is not importable ({type(exc).__name__}: {exc}); {self._install_hint}"
        self._loaded = True

    def availability(self) -> tuple[bool, str]:
        self._load()
        return self._module is not None, self._error

    def get(self) -> Any:
        """The imported library (or whatever ``importer`` returned); raises with the reason if unavailable."""
        self._load()
        if self._module is None:
            raise RuntimeError(self._error)
        return self._module
