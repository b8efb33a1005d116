"""``sparse``: the recommended true-sparse backend, on our own kernels (see ``kernels/gemm.py``)."""
from __future__ import annotations

from .registry import register_backend
from .sparse import SparseBackend

__all__ = ["FastSparseBackend"]


@register_backend
class FastSparseBackend(SparseBackend):
    name = "sparse"
    description = "our gather-GEMM kernels with scatter-free backward (recommended true-sparse backend)"
    kernels = ("gemm", "gather")
