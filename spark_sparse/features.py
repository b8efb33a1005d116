"""What flows through a backend-converted encoder: feature values plus the active mask.

A converted encoder keeps the user's (or timm's) own ``forward`` code; only its modules change.
The value passed between modules is a feature map object that knows its mask, so modules never
consult global state. Two representations exist:

- :class:`MaskedDense`: SparK's reference, a dense ``(B, C, H, W)`` tensor that is zero at masked
  sites (the ``masked`` backend);
- :class:`SparseRows`: the true sparse form, a ``[N, C]`` matrix whose rows are the active sites of
  ``mask.coords_at(stride)`` (the sparse backends).

Both support ``+`` (residual adds) and :meth:`per_site` (any function of each site's channel vector:
activations, Linear layers, layer-scale), so a block written once runs on every backend.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .mask import ActiveMask

__all__ = ["FeatureMap", "MaskedDense", "SparseRows", "sample_drop_path_keep"]


def sample_drop_path_keep(batch_size: int, drop_prob: float, scale_by_keep: bool,
                          like: torch.Tensor) -> torch.Tensor:
    """Per-image DropPath factors ``[B]`` (0 or 1/keep), drawn exactly as timm's ``drop_path`` does.

    Both representations draw their factors here, so the same seed drops the same images on every
    backend.
    """
    keep = 1.0 - drop_prob
    factors = like.new_empty((batch_size, 1, 1, 1)).bernoulli_(keep)
    if keep > 0.0 and scale_by_keep:
        factors.div_(keep)
    return factors.view(batch_size)


class FeatureMap:
    """Common interface of the two representations."""

    mask: ActiveMask
    stride: int
    data: torch.Tensor

    @property
    def channels(self) -> int:
        raise NotImplementedError

    def with_data(self, data: torch.Tensor) -> "FeatureMap":
        return type(self)(data, self.mask, self.stride)

    def per_site(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "FeatureMap":
        """Apply ``fn`` to each site's channel vector (``fn`` maps ``[..., C]`` to ``[..., C']``)."""
        raise NotImplementedError

    def elementwise(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "FeatureMap":
        """Apply a zero-preserving elementwise function (ReLU, GELU, ...)."""
        return self.with_data(fn(self.data))

    def drop_path(self, drop_prob: float, training: bool, scale_by_keep: bool = True) -> "FeatureMap":
        raise NotImplementedError

    def active_rows(self) -> torch.Tensor:
        """``[N, C]``: the features of the active sites, in ``mask.coords_at(stride)`` order."""
        raise NotImplementedError

    def with_active_rows(self, rows: torch.Tensor) -> "FeatureMap":
        """A feature map of the same sites holding ``rows`` ``[N, C']`` (zero at masked sites)."""
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """``(B, C, H, W)`` with exact zeros at masked sites."""
        raise NotImplementedError

    def _check_same_sites(self, other: "FeatureMap") -> None:
        if not isinstance(other, type(self)) or other.mask is not self.mask or other.stride != self.stride:
            raise ValueError(
                f"cannot add feature maps of different kinds, masks or strides "
                f"({type(self).__name__} stride {self.stride} + {type(other).__name__} stride {getattr(other, 'stride', '?')})"
            )

    def __add__(self, other: "FeatureMap") -> "FeatureMap":
        self._check_same_sites(other)
        return self.with_data(self.data + other.data)

    __iadd__ = __add__


class MaskedDense(FeatureMap):
    """Dense ``(B, C, H, W)`` features, zero at masked sites (SparK's representation)."""

    def __init__(self, data: torch.Tensor, mask: ActiveMask, stride: int):
        self.data, self.mask, self.stride = data, mask, stride

    @classmethod
    def from_image(cls, images: torch.Tensor, mask: ActiveMask) -> "MaskedDense":
        return cls(images * mask.dense_at(1), mask, 1)

    @property
    def channels(self) -> int:
        return self.data.shape[1]

    def site_mask(self) -> torch.Tensor:
        return self.mask.dense_at(self.stride)

    def per_site(self, fn):
        out = fn(self.data.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        # Per-site functions may map zero to non-zero (a Linear's bias): SparK masks them before
        # they reach a residual add, so do it here, once.
        return self.with_data(out * self.site_mask())

    def drop_path(self, drop_prob, training, scale_by_keep=True):
        if drop_prob == 0.0 or not training:
            return self
        keep = sample_drop_path_keep(self.data.shape[0], drop_prob, scale_by_keep, self.data)
        return self.with_data(self.data * keep.view(-1, 1, 1, 1))

    def active_rows(self):
        return self.data.permute(0, 2, 3, 1)[self.site_mask()[:, 0]]

    def with_active_rows(self, rows):
        b, _, h, w = self.data.shape
        out = rows.new_zeros(b, h, w, rows.shape[1])
        out[self.site_mask()[:, 0]] = rows
        return self.with_data(out.permute(0, 3, 1, 2))

    def to_dense(self):
        return self.data


class SparseRows(FeatureMap):
    """``[N, C]`` features of the active sites at ``stride``, rows ordered as ``mask.coords_at(stride)``.

    ``recompute``, when given, remakes ``data`` from tensors autograd keeps anyway (e.g. a ReLU
    output from its BatchNorm's input), so a consumer may save that recipe instead of the rows for
    backward. Any new data (:meth:`with_data`) drops it.
    """

    def __init__(self, data: torch.Tensor, mask: ActiveMask, stride: int,
                 recompute: Optional[Callable[[], torch.Tensor]] = None):
        self.data, self.mask, self.stride, self.recompute = data, mask, stride, recompute

    @classmethod
    def from_image(cls, images: torch.Tensor, mask: ActiveMask) -> "SparseRows":
        b, y, x = mask.coords_at(1).unbind(1)
        return cls(images.permute(0, 2, 3, 1)[b, y, x], mask, 1)

    @property
    def channels(self) -> int:
        return self.data.shape[1]

    def per_site(self, fn):
        return self.with_data(fn(self.data))

    def active_rows(self):
        return self.data

    def with_active_rows(self, rows):
        return self.with_data(rows)

    def drop_path(self, drop_prob, training, scale_by_keep=True):
        if drop_prob == 0.0 or not training:
            return self
        keep = sample_drop_path_keep(self.mask.batch_size, drop_prob, scale_by_keep, self.data)
        rows_batch = self.mask.coords_at(self.stride)[:, 0]
        return self.with_data(self.data * keep[rows_batch].unsqueeze(1))

    def to_dense(self):
        b, y, x = self.mask.coords_at(self.stride).unbind(1)
        grid = self.mask.dense_at(self.stride)
        out = self.data.new_zeros(grid.shape[0], grid.shape[2], grid.shape[3], self.channels)
        out[b, y, x] = self.data
        return out.permute(0, 3, 1, 2)
