"""``torch``: true sparse rows on the pure-PyTorch ``gather`` reference kernel (any device, dtype, layer)."""
from __future__ import annotations

from .registry import register_backend
from .rows import RowBackend

__all__ = ["TorchGatherBackend"]


@register_backend
class TorchGatherBackend(RowBackend):
    name = "torch"
    description = "true sparse rows, pure-PyTorch gather-GEMM reference kernel (any device, dtype, layer)"
    kernels = ("gather",)
