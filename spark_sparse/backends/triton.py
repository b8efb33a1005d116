"""``triton``: the ``sparse`` backend with its convolutions on our Triton CUDA kernels.

Everything but the convolution kernels is the ``sparse`` backend's (fused BatchNorm+ReLU,
argmax max-pool, rows Linear). Convs run on ``triton`` (:mod:`spark_sparse.kernels.triton_conv`),
depthwise ones included, with ``gemm`` and ``gather`` behind it for what Triton cannot run (fp64);
stems on the image still run on ``dense``, for the ``sparse`` backend's reason (no stride-1
neighbour table for 3-channel rows). It exists so benchmarks and the measured dispatch can put the
Triton kernels beside the others; without a CUDA device (or without triton) it is unavailable and
says why.
"""
from __future__ import annotations

from ..kernels import ConvSpec, list_kernels
from .registry import register_backend
from .sparse import SparseBackend

__all__ = ["TritonBackend"]


@register_backend
class TritonBackend(SparseBackend):
    name = "triton"
    description = "our Triton implicit-GEMM kernels on CUDA, depthwise too (CUDA only)"
    kernels = ("triton", "gemm", "gather")

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return list_kernels()["triton"].availability()

    def kernels_for(self, spec: ConvSpec) -> tuple[str, ...]:
        if spec.in_channels <= self.IMAGE_LIKE_CHANNELS and not spec.is_depthwise:
            return ("dense",) + self.kernel_priority
        return self.kernel_priority
