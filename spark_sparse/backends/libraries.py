"""Backends on third-party sparse-convolution libraries (``spconv``, ``minkowski``).

Each is its library's kernel first, then our own dtype-general kernels for layers the library
cannot run (spconv has no grouped convs, so ConvNeXt's depthwise 7x7 falls back; neither library
has bf16): ``gemm`` (a gather over active neighbours through the dense index grid, per-tap
multiply-adds for depthwise) and the reference ``gather``. ``--strict-backend`` turns such a
fallback into an error.
"""
from __future__ import annotations

from ..kernels import list_kernels

from .registry import register_backend
from .rows import RowBackend

__all__ = ["SpconvBackend", "MinkowskiBackend"]


class _LibraryBackend(RowBackend):
    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return list_kernels()[cls.kernels[0]].availability()


@register_backend
class SpconvBackend(_LibraryBackend):
    name = "spconv"
    description = "spconv 2.x gather-GEMM-scatter on exact rulebooks (depthwise/bf16 fall back to gemm)"
    kernels = ("spconv", "gemm", "gather")


@register_backend
class MinkowskiBackend(_LibraryBackend):
    name = "minkowski"
    description = "MinkowskiEngine 0.5.4 on explicit coordinates (fp16/bf16 fall back to gemm)"
    kernels = ("minkowski", "gemm", "gather")
