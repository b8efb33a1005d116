"""Max-pooling after explicit zero padding, as one layer backends can convert.

timm's BiT ResNet-V2 stem pads with ``nn.ConstantPad2d(1, 0.)`` and then max-pools with
``padding=0``; PP-HGNet-V2's stem pads the bottom and right with ``F.pad(x, (0, 1, 0, 1))`` before a
2x2 stride-1 pool. There the padding competes as a zero, unlike ``MaxPool2d(padding=1)`` whose
padding never wins. A padding on its own cannot be made sparse (it changes the map's geometry), so
each pair becomes one :class:`ConstantPadMaxPool2d` that computes exactly the pair's output (dense
forward: ``max_pool2d(pad(x, 0))``): BiT's modules in an ``nn.Sequential`` through
:func:`fold_zero_pad_into_max_pool` (an ``nn.Identity`` takes the pad's place), HGNet-V2's functional
pad through its stem's rewrite (:mod:`spark_sparse.models.hgnet`). Neither has state, so state dicts
are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConstantPadMaxPool2d", "fold_zero_pad_into_max_pool"]


class ConstantPadMaxPool2d(nn.MaxPool2d):
    """``MaxPool2d(kernel, stride, padding=0)`` of the input zero-padded by ``pad``.

    ``pad``: one int for every side, or ``(left, right, top, bottom)`` as ``F.pad`` takes it (kept in
    that form). Masked sites and padding both read 0 (in SparK's dense tensor both are zeros), so on a
    feature map this is the max over the window of ``0`` and the active values under it wherever the
    window reaches padding or masked sites.
    """

    def __init__(self, kernel_size, stride, pad: int | tuple[int, int, int, int], dilation=1,
                 ceil_mode: bool = False):
        super().__init__(kernel_size, stride, padding=0, dilation=dilation, ceil_mode=ceil_mode)
        sides = (pad,) * 4 if isinstance(pad, int) else tuple(pad)
        if len(sides) != 4:
            raise ValueError(f"pad must be an int or (left, right, top, bottom), got {pad!r}")
        self.pad: tuple[int, int, int, int] = tuple(int(side) for side in sides)

    @property
    def leading_padding(self) -> tuple[int, int]:
        """``(top, left)``: the padding before the first site, which is how sparse kernels read a window."""
        return self.pad[2], self.pad[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, self.pad, value=0.0)
        return F.max_pool2d(padded, self.kernel_size, self.stride, 0, self.dilation, ceil_mode=self.ceil_mode)

    def extra_repr(self) -> str:
        return f"pad={self.pad}, " + super().extra_repr()


def _is_symmetric_zero_pad(module: nn.Module) -> bool:
    if type(module) is not nn.ConstantPad2d or module.value != 0.0:
        return False
    return len(set(module.padding)) == 1


def fold_zero_pad_into_max_pool(model: nn.Module) -> nn.Module:
    """In every ``nn.Sequential`` below ``model``, ``ConstantPad2d(p, 0.)`` directly followed by a
    ``MaxPool2d(padding=0)`` becomes ``Identity`` + :class:`ConstantPadMaxPool2d` (same output); in place."""
    for sequence in [m for m in model.modules() if type(m) is nn.Sequential]:
        names = list(sequence._modules)
        for first, second in zip(names, names[1:]):
            pad, pool = sequence._modules[first], sequence._modules[second]
            if (_is_symmetric_zero_pad(pad) and type(pool) is nn.MaxPool2d and pool.padding in (0, (0, 0))
                    and not pool.return_indices):
                sequence._modules[first] = nn.Identity()
                sequence._modules[second] = ConstantPadMaxPool2d(pool.kernel_size, pool.stride, pad.padding[0],
                                                                 pool.dilation, pool.ceil_mode)
    return model
