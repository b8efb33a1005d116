"""The library's dense ``conv2d``, with strided 1x1 convolutions made unit-stride first on the CPU.

oneDNN's 1x1 convolution with stride > 1 reduces the input to unit stride in a workspace of its own
("rtus"); its weight-gradient kernel writes past that workspace when the input is NHWC
(channels-last) and has fewer channels than oneDNN's channel block (8 or 16): heap corruption, a
crash, or wrong weight gradients without one (oneDNN issue 6035, open; torch 2.11 and 2.14.1 both
crash on ``F.conv2d`` of a channels-last ``(8, 3, 224, 224)`` input with a ``(64, 3, 1, 1)`` weight,
stride 2, in backward). RepVGG's and MobileOne's stems have exactly this layer: a 1x1 stride-2
branch on the 3-channel image.

A 1x1 convolution without padding reads only the input pixels at multiples of the stride, so slicing
those first and convolving with stride 1 is the same sum of the same products (its gradient scatters
back into the unread pixels as zeros). Only the library call changes, not the maths.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from .base import int_pair

__all__ = ["dense_conv2d", "is_strided_pointwise"]

IntPair = Union[int, tuple[int, int]]


def is_strided_pointwise(weight: torch.Tensor, stride: IntPair, padding: Union[IntPair, str]) -> bool:
    """A 1x1 kernel, stride > 1 in some direction, no padding: the shape oneDNN mishandles."""
    unpadded = padding == "valid" or (not isinstance(padding, str) and int_pair(padding) == (0, 0))
    return tuple(weight.shape[2:]) == (1, 1) and unpadded and int_pair(stride) != (1, 1)


def dense_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: IntPair = 1,
                 padding: Union[IntPair, str] = 0, dilation: IntPair = 1, groups: int = 1) -> torch.Tensor:
    """``F.conv2d`` with the same arguments, through a unit-stride call for strided 1x1 convs on the CPU."""
    if x.device.type == "cpu" and is_strided_pointwise(weight, stride, padding):
        step_h, step_w = int_pair(stride)
        return F.conv2d(x[:, :, ::step_h, ::step_w], weight, bias, groups=groups)
    return F.conv2d(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)
