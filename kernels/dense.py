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
        site_in = call.mask.dense_at(call.in_stride)[:, 0]
        batch, height, width = site_in.shape
        dense = features.new_zeros(batch, height, width, features.shape[1])
        dense = dense.index_put((site_in,), features)                          # NHWC, zero at masked sites
        stride = call.out_stride // call.in_stride
        out = dense_conv2d(dense.permute(0, 3, 1, 2), weight, bias, stride=stride, padding=call.padding,
                           dilation=call.dilation, groups=call.groups)
        return out.permute(0, 2, 3, 1)[call.mask.dense_at(call.out_stride)[:, 0]]
