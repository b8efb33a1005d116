"""TensorFlow "SAME" padding (timm's ``Conv2dSame`` family) on SparK's grids.

timm's ``tf_*`` models (EfficientNet, EfficientNet-V2, MixNet, MobileNet-V3 ported from TensorFlow)
pad each strided convolution at run time: ``total = max((ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)``
zeros along an axis of ``n`` sites, ``total // 2`` before and the rest after, so a 3x3 stride-2 conv
reads rows ``2i .. 2i + 2`` where ``nn.Conv2d(padding=1)`` reads ``2i - 1 .. 2i + 1``.

On SparK's maps every axis holds ``m * s`` sites (inputs are multiples of the largest stride), and
there ``total = (k - 1) * d + 1 - s`` does not depend on ``m``: the layer is a fixed convolution
whose output ``i`` reads input ``i * s - lead + j * d`` (``j`` over the kernel taps), zero outside
the map, with ``m`` outputs. That is exactly how every sparse kernel reads a convolution's
``padding``: the LEADING padding, with the output grid the input grid downsampled by the stride
(:meth:`~spark_sparse.mask.ActiveMask.neighbour_table`); the ``dense`` kernel pads the trailing side
to that grid. So a SAME conv converts to the backend's conv with ``padding = lead`` and no other
change, and ``masked`` runs timm's own dynamic padding (the reference maths, for any size).

``StdConv2dSame`` / ``ScaledStdConv2dSame`` pad this way only when their ``same_pad`` flag is set
(stride > 1 or an even kernel); otherwise their static padding is symmetric, as a plain conv's.
"""
from __future__ import annotations

import torch.nn as nn
from timm.layers import Conv2dSame, ScaledStdConv2dSame, StdConv2dSame

from ..kernels.base import int_pair

__all__ = ["SAME_PADDED_CONVS", "pads_same", "grid_padding"]

#: conv types whose padding may be TensorFlow's dynamic "SAME" (exact types, as every converter table)
SAME_PADDED_CONVS: tuple[type, ...] = (Conv2dSame, StdConv2dSame, ScaledStdConv2dSame)


def pads_same(conv: nn.Conv2d) -> bool:
    """Whether ``conv``'s forward pads its input TensorFlow-"SAME"-style at run time."""
    if type(conv) is Conv2dSame:
        return True
    return type(conv) in SAME_PADDED_CONVS and bool(getattr(conv, "same_pad", False))


def grid_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """The leading padding ``(top, left)`` that ``conv`` reads on maps of ``m * stride`` sites.

    For a plain conv that is its own (symmetric) padding; for a SAME conv, half of
    ``(k - 1) * d + 1 - s`` (rounded down), the part TensorFlow puts before the first site.
    """
    if not pads_same(conv):
        return int_pair(conv.padding)
    kernel, stride, dilation = int_pair(conv.kernel_size), int_pair(conv.stride), int_pair(conv.dilation)
    return tuple(max((k - 1) * d + 1 - s, 0) // 2 for k, s, d in zip(kernel, stride, dilation))
