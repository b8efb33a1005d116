"""Nearest-neighbour upsampling by an integer factor (HRNet's fusion of a coarse branch into a finer one).

SparK's masks are patch masks: a site at stride ``s`` is active exactly when its patch is, and so is
every site it covers at stride ``s / f``. Nearest upsampling copies each coarse site into the
``f x f`` fine sites it covers, so the upsampled masked map is zero exactly at the fine masked
sites: the masked map of the upsampled features. ``masked`` computes it densely (``F.interpolate``,
then the mask at the new stride, as SparK masks every layer's output); the sparse backends copy each
fine active site's parent row, found through the coarse map's index grid.

Only ``nn.Upsample(scale_factor=f, mode="nearest")`` with one integer factor for both axes converts:
bilinear or bicubic modes would mix masked zeros into active sites with weights a row gather does
not have, and ``size=`` ties the layer to one input size; they are refused, naming the module.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..features import MaskedDense, SparseRows

__all__ = ["nearest_factor", "MaskedNearestUpsample", "SparseNearestUpsample"]


def nearest_factor(module: nn.Upsample, name: str) -> int:
    """The integer factor of a nearest ``nn.Upsample``; anything else is refused with the reason."""
    scale = module.scale_factor
    scales = tuple(scale) if isinstance(scale, (tuple, list)) else (scale, scale)
    if module.mode != "nearest" or module.size is not None or scales[0] != scales[1] or scales[0] is None \
            or float(scales[0]) != int(scales[0]) or int(scales[0]) < 1:
        raise NotImplementedError(
            f"{name}: nn.Upsample(size={module.size}, scale_factor={module.scale_factor}, mode={module.mode!r}) "
            f"is not supported: only nearest upsampling by one integer factor (scale_factor=f, mode='nearest') "
            f"keeps masked sites exactly zero and active sites a copy of one coarse site")
    return int(scales[0])


def _finer_stride(stride: int, factor: int, name: str) -> int:
    if stride % factor:
        raise ValueError(f"{name}: upsampling a stride-{stride} map by {factor} gives no integer stride")
    return stride // factor


class _NearestUpsample(nn.Module):
    def __init__(self, factor: int, name: str = ""):
        super().__init__()
        self.factor, self.layer_name = factor, name

    def extra_repr(self) -> str:
        return f"factor={self.factor}"

    @classmethod
    def from_dense(cls, backend, module: nn.Upsample, name: str = "") -> "_NearestUpsample":
        return cls(nearest_factor(module, name), name)


class MaskedNearestUpsample(_NearestUpsample):
    """Dense nearest upsampling of the masked map, output masked (SparK's way)."""

    def forward(self, x: MaskedDense) -> MaskedDense:
        stride = _finer_stride(x.stride, self.factor, self.layer_name)
        out = F.interpolate(x.data, scale_factor=self.factor, mode="nearest")
        return MaskedDense(out * x.mask.dense_at(stride), x.mask, stride)

    def describe_execution(self, device, dtype) -> str:
        return "dense nearest upsample x mask (torch)"


class SparseNearestUpsample(_NearestUpsample):
    """Each active site at the finer stride takes its covering coarse site's row."""

    def forward(self, x: SparseRows) -> SparseRows:
        stride = _finer_stride(x.stride, self.factor, self.layer_name)
        # index_select: its backward is an index_add (advanced indexing's accumulating index_put is not
        # guaranteed deterministic), so a resumed run sums the children's gradients in the same order
        return SparseRows(x.data.index_select(0, self._parents(x, stride)), x.mask, stride)

    def _parents(self, x: SparseRows, stride: int) -> torch.Tensor:
        def build():
            b, y, w = x.mask.coords_at(stride).unbind(1)
            return x.mask.index_grid(x.stride)[b, y // self.factor, w // self.factor]
        return x.mask.cached(("nearest-upsample-parents", x.stride, stride), build)

    def describe_execution(self, device, dtype) -> str:
        return "gather     nearest upsample (parent rows)"
