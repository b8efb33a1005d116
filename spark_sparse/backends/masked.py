"""The ``masked`` backend: SparK's own semantics, the reference every other backend must match.

Dense tensors end to end; each convolution and pooling runs densely over the masked input and its
output is multiplied by the mask at the output's resolution. Norms use active sites only (see
:mod:`.common`). This wastes the compute spent on masked sites, which is what the sparse backends
save, but it is exactly what SparK computes.
"""
from __future__ import annotations

import torch.nn as nn
from timm.layers import SpaceToDepth
from timm.layers.blur_pool import BlurPool2d
from timm.layers.padding import pad_same

from ..features import MaskedDense
from ..kernels._dense_conv import dense_conv2d
from .base import Backend
from .common import COMMON_CONVERTERS, ConvertedBlurPool2d, adopt_state, check_output_grid
from .conv_weights import WEIGHT_TRANSFORMS, copy_transform_attributes, weight_for_forward
from .pools import ConstantPadMaxPool2d
from .registry import register_backend
from .same_padding import pads_same
from .space_to_depth import MaskedSpaceToDepth
from .upsample import MaskedNearestUpsample

__all__ = ["MaskedBackend", "MaskedConv2d", "MaskedMaxPool2d", "MaskedConstantPadMaxPool2d", "MaskedAvgPool2d",
           "MaskedBlurPool2d"]


def _output_stride(module: nn.Module, x: MaskedDense) -> int:
    stride = module.stride if isinstance(module.stride, int) else module.stride[0]
    return x.stride * stride


class MaskedConv2d(nn.Conv2d):
    """Dense convolution of the masked input, output multiplied by the output-resolution mask.

    Weight-standardised convs (timm's ``StdConv2d``, ``ScaledStdConv2d``) convert to this class with
    their weight transform (see :mod:`.conv_weights`); TensorFlow-"SAME" convs (``Conv2dSame``, ...)
    with ``same_pad`` set, padding their input at run time exactly as timm does (:mod:`.same_padding`).
    """

    weight_transform = None
    same_pad = False

    def weight_for_forward(self):
        """The weight the convolution uses (standardised for ``StdConv2d`` and friends)."""
        return weight_for_forward(self)

    def forward(self, x: MaskedDense) -> MaskedDense:
        if self.same_pad:
            out = dense_conv2d(pad_same(x.data, self.kernel_size, self.stride, self.dilation),
                               self.weight_for_forward(), self.bias, self.stride, 0, self.dilation, self.groups)
        elif self.padding_mode == "zeros":     # dense_conv2d: strided 1x1 convs avoid a oneDNN bug on the CPU
            out = dense_conv2d(x.data, self.weight_for_forward(), self.bias, self.stride, self.padding,
                               self.dilation, self.groups)
        else:
            out = self._conv_forward(x.data, self.weight_for_forward(), self.bias)
        stride = _output_stride(self, x)
        return MaskedDense(out * x.mask.dense_at(stride), x.mask, stride)

    def describe_execution(self, device, dtype) -> str:
        return "dense conv x mask (torch)"

    @classmethod
    def from_dense(cls, backend, conv: nn.Conv2d, name: str = "") -> "MaskedConv2d":
        same_pad = pads_same(conv)
        if conv.padding != "same" and not same_pad:     # both keep the grid of m * stride sites by definition
            check_output_grid(conv, name)
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode)
        new.same_pad = same_pad
        copy_transform_attributes(new, conv)
        return adopt_state(new, conv)


class MaskedMaxPool2d(nn.MaxPool2d):
    """Dense max-pool of the masked input (masked sites count as zeros), output masked."""

    def forward(self, x: MaskedDense) -> MaskedDense:
        stride = _output_stride(self, x)
        return MaskedDense(super().forward(x.data) * x.mask.dense_at(stride), x.mask, stride)

    def describe_execution(self, device, dtype) -> str:
        return "dense max-pool x mask (torch)"

    @classmethod
    def from_dense(cls, backend, pool: nn.MaxPool2d, name: str = "") -> "MaskedMaxPool2d":
        if pool.return_indices:
            raise NotImplementedError(f"{name}: max-pool with return_indices=True is not supported")
        check_output_grid(pool, name)
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, ceil_mode=pool.ceil_mode)


class MaskedConstantPadMaxPool2d(ConstantPadMaxPool2d):
    """Zero padding then max-pool of the masked input (padding and masked sites count as 0), output masked."""

    def forward(self, x: MaskedDense) -> MaskedDense:
        stride = _output_stride(self, x)
        return MaskedDense(super().forward(x.data) * x.mask.dense_at(stride), x.mask, stride)

    def describe_execution(self, device, dtype) -> str:
        return "dense pad + max-pool x mask (torch)"

    @classmethod
    def from_dense(cls, backend, pool: ConstantPadMaxPool2d, name: str = "") -> "MaskedConstantPadMaxPool2d":
        check_output_grid(pool, name, padding=pool.pad)
        return cls(pool.kernel_size, pool.stride, pool.pad, pool.dilation, ceil_mode=pool.ceil_mode)


class MaskedAvgPool2d(nn.AvgPool2d):
    """Dense average-pool of the masked input, output masked."""

    def forward(self, x: MaskedDense) -> MaskedDense:
        stride = _output_stride(self, x)
        return MaskedDense(super().forward(x.data) * x.mask.dense_at(stride), x.mask, stride)

    def describe_execution(self, device, dtype) -> str:
        return "dense avg-pool x mask (torch)"

    @classmethod
    def from_dense(cls, backend, pool: nn.AvgPool2d, name: str = "") -> "MaskedAvgPool2d":
        check_output_grid(pool, name)
        return cls(pool.kernel_size, pool.stride, pool.padding, ceil_mode=pool.ceil_mode,
                   count_include_pad=pool.count_include_pad, divisor_override=pool.divisor_override)


class MaskedBlurPool2d(ConvertedBlurPool2d):
    """timm's blur pool (padding, fixed binomial depthwise filter, stride) of the masked input, output masked."""

    def forward(self, x: MaskedDense) -> MaskedDense:
        stride = _output_stride(self, x)
        return MaskedDense(super().forward(x.data) * x.mask.dense_at(stride), x.mask, stride)

    def describe_execution(self, device, dtype) -> str:
        return f"dense blur-pool ({self.pad_mode} padding) x mask (torch)"


@register_backend
class MaskedBackend(Backend):
    name = "masked"
    description = "SparK's masked dense convolution (the reference semantics)"
    feature_type = MaskedDense
    converters = {
        **COMMON_CONVERTERS,
        **{conv_type: MaskedConv2d.from_dense for conv_type in WEIGHT_TRANSFORMS},
        nn.MaxPool2d: MaskedMaxPool2d.from_dense,
        ConstantPadMaxPool2d: MaskedConstantPadMaxPool2d.from_dense,
        nn.AvgPool2d: MaskedAvgPool2d.from_dense,
        BlurPool2d: MaskedBlurPool2d.from_dense,
        nn.Upsample: MaskedNearestUpsample.from_dense,
        SpaceToDepth: MaskedSpaceToDepth.from_dense,
    }
