"""``dense``: scatter the active rows into a zero map, run the library's dense conv, gather the outputs.

It computes masked sites too (the cost of SparK's masked convolution), but through oneDNN/cuDNN's
tuned kernels. On the CPUs measured that beats the gather-based depthwise 7x7 at every ConvNeXt stage
(per-layer fwd+bwd of both: ``python benchmarks/kernel_profile.py --model convnext_tiny --batch 16
--layers --candidates gemm dense``), so the ``sparse`` backend runs depthwise layers here;
everything else goes through ``gemm``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._dense_conv import dense_conv2d
from .base import ConvCall, SparseConvKernel
from .registry import register_kernel

__all__ = ["DenseScatterKernel"]


@register_kernel
class DenseScatterKernel(SparseConvKernel):
    NAME = "dense"
    DESCRIPTION = "rows scattered to a dense NHWC map, library conv, active outputs gathered"

    def conv(self, features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             call: ConvCall) -> torch.Tensor:
        batch, channels = call.mask.batch_size, features.shape[1]
        height, width = call.mask.map_hw(call.in_stride)
        # rows in and out through flat site indices (an index_put, an index_select: their backwards are a gather
        # and a scatter-add), cheaper than boolean indexing's; not index_copy, whose backward keeps its source
        flat_in = call.mask.flat_index(call.in_stride)
        dense = features.new_zeros(batch * height * width, channels).index_put((flat_in,), features)
        dense = dense.view(batch, height, width, channels)                     # NHWC, zero at masked sites
        out_hw = call.mask.map_hw(call.out_stride)
        stride = call.out_stride // call.in_stride
        dense, padding = _pad_for_grid(dense.permute(0, 3, 1, 2), out_hw, stride, call)
        out = dense_conv2d(dense, weight, bias, stride=stride, padding=padding, dilation=call.dilation,
                           groups=call.groups)
        out = out.permute(0, 2, 3, 1).reshape(batch * out_hw[0] * out_hw[1], -1)
        return out.index_select(0, call.mask.flat_index(call.out_stride))


def _pad_for_grid(dense: torch.Tensor, out_hw: tuple[int, int], stride: int,
                  call: ConvCall) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(input, padding)`` for ``F.conv2d`` that read ``call``'s taps and give the ``out_hw`` grid.

    ``call.padding`` is the leading padding (as every kernel reads it); the trailing side is what the
    output grid needs. When that equals the leading side (every symmetric conv) the library pads; a
    TensorFlow-"SAME" conv (less before than after) gets its zeros explicitly.
    """
    trailing = []
    for size_in, size_out, k, d, lead in zip(dense.shape[2:], out_hw, call.kernel_size, call.dilation, call.padding):
        span = (k - 1) * d + 1
        symmetric_out = (size_in + 2 * lead - span) // stride + 1
        trailing.append(lead if symmetric_out == size_out else (size_out - 1) * stride + span - size_in - lead)
    if tuple(trailing) == tuple(call.padding):
        return dense, call.padding
    (top, left), (bottom, right) = call.padding, trailing
    return F.pad(dense, (left, right, top, bottom)), (0, 0)
