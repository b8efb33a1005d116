"""``sparse``: the recommended true-sparse backend, on our own kernels.

Per layer it picks the kernel measured fastest for the layer's kind on this kind of device (a
simple cost model from measurements, see ``benchmarks/kernel_profile.py --layers --candidates gemm
dense`` and kernels/dense.py): depthwise convs and stems on the image run on ``dense`` (scatter,
the library's conv, gather: on CPU faster than any gather-based depthwise we measured; the stem
avoids a stride-1 neighbour table), every other conv on ``gemm`` (gather-GEMM through oneDNN, no
scatter in backward); ``gather`` is the fallback. Linear layers on the active rows (ConvNeXt's
MLP) go through the same oneDNN route as ``gemm``. BatchNorm -> ReLU pairs that model families
declare (:func:`~spark_sparse.backends.fused.register_bn_relu_pairs`) are fused.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..features import SparseRows
from ..kernels import ConvSpec
from ..kernels._rowmatmul import rows_times_weight
from ..kernels.pooling import max_pool_rows
from .common import adopt_state
from .fused import bn_relu_pairs_of, fuse_bn_relu_pairs
from .registry import register_backend
from .rows import RowBackend, SparseMaxPool2d

__all__ = ["SparseBackend", "RowLinear", "ArgmaxMaxPool2d"]


class RowLinear(nn.Linear):
    """nn.Linear whose product on ``[N, C]`` rows runs through oneDNN where that is faster."""

    def forward(self, x):
        if x.dim() != 2:
            return F.linear(x, self.weight, self.bias)
        out = rows_times_weight(x, self.weight)
        # under autocast the product is in the autocast dtype, as nn.Linear's output: the bias joins it there
        return out if self.bias is None else out + self.bias.to(out.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "RowLinear":
        return adopt_state(cls(linear.in_features, linear.out_features, bias=linear.bias is not None), linear)


class ArgmaxMaxPool2d(SparseMaxPool2d):
    """:class:`SparseMaxPool2d` (same semantics) that saves the winning tap, not the window, for backward."""

    def forward(self, x: SparseRows) -> SparseRows:
        call, table = self._call(x)
        return SparseRows(max_pool_rows(x.data, table), x.mask, call.out_stride)

    def describe_execution(self, device, dtype) -> str:
        return f"{'pool':<10} {type(self).__name__} (neighbour-table max, uint8 argmax kept for backward)"


@register_backend
class SparseBackend(RowBackend):
    name = "sparse"
    description = "our kernels: gather-GEMM (oneDNN, scatter-free backward), dense-scatter depthwise (recommended)"
    kernels = ("gemm", "gather")
    converters = {**RowBackend.converters, nn.MaxPool2d: ArgmaxMaxPool2d.from_dense}
    #: convs with at most this many input channels (stems on the image) run on ``dense``: gathering
    #: 3-channel rows through a ``[N_out, 49]`` table at stride 1 (built each step, 31 MB for
    #: ResNet-50 at batch 16) costs more than the dense conv's work at masked sites
    IMAGE_LIKE_CHANNELS = 4

    def convert_module(self, module: nn.Module, qualified: str, skip: frozenset = frozenset(),
                       users_layout: bool = False) -> nn.Module:
        converted = super().convert_module(module, qualified, skip, users_layout)
        fuse_bn_relu_pairs(self, converted, bn_relu_pairs_of(module))
        return converted

    def kernels_for(self, spec: ConvSpec) -> tuple[str, ...]:
        if spec.is_depthwise or spec.in_channels <= self.IMAGE_LIKE_CHANNELS:
            return ("dense",) + self.kernel_priority
        return self.kernel_priority

    def adapt_per_site_module(self, module: nn.Module) -> nn.Module:
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, RowLinear.from_linear(child))
            else:
                self.adapt_per_site_module(child)
        return module
