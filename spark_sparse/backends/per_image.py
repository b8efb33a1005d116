"""Per-image statistics over the ACTIVE sites of a feature map, for both representations.

Layers that look beyond one site (squeeze-excitation, ECA, GroupNorm, ConvNeXt-V2's GRN) reduce over
each image's active sites only: masked patches are not part of the image the encoder sees (SparK
issue 54 asks exactly this of SE's global pooling). In the dense representation masked sites hold
exact zeros, so a sum over the whole map is the sum over the active sites; counts come from the mask.

Two operations cover those layers, each implemented once per representation (a
``functools.singledispatch`` registry, so another representation registers its own):

- :func:`image_sums`: ``[B, C]`` sums over each image's active sites of a tensor laid out like the
  feature map's data, accumulated and returned in at least fp32 (bf16/fp16 rows of one image can
  number thousands);
- :func:`per_site_values`: ``[B, C]`` per-image values placed at each active site (zero at masked
  sites), laid out like the data, to combine with it elementwise.

Attention-like layers that work on the active rows themselves (whatever the representation, through
``active_rows()``) reduce with :func:`sum_per_image` and :func:`normalize_per_image`.

Per-image values reach their rows through ``index_select``, never ``values[index]``: on the CPU the
backward of advanced indexing (an accumulating ``index_put``) is not deterministic for some shapes
(``[2, 64]`` values gathered to 800 rows gave 30 different gradients in 30 runs here), while
``index_select``'s (an index-add) is, and an exact resume needs bit-identical gradients.
"""
from __future__ import annotations

from functools import singledispatch
from typing import Optional

import torch

from ..features import FeatureMap, MaskedDense, SparseRows

__all__ = ["active_counts", "image_sums", "image_means", "image_softmax", "normalize_per_image", "per_site_values",
           "scale_per_image", "statistics_dtype", "sum_per_image"]


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-image statistics are computed in: at least fp32 (as autocast runs norms)."""
    return torch.promote_types(dtype, torch.float32)


def sum_per_image(values: torch.Tensor, image_of_row: torch.Tensor, batch: int) -> torch.Tensor:
    """``[B, ...]``: per image, the sum of ``values [N, ...]`` over its rows (an index-add in ``values``'
    dtype; ``image_of_row``: each row's image)."""
    return values.new_zeros(batch, *values.shape[1:]).index_add_(0, image_of_row, values)


def normalize_per_image(values: torch.Tensor, image_of_row: torch.Tensor, batch: int) -> torch.Tensor:
    """``F.normalize`` over each image's rows: ``values [N, ...]`` divided by the L2 norm, over the rows of
    its image, of each remaining index (eps 1e-12, as ``F.normalize``)."""
    norms = sum_per_image(values * values, image_of_row, batch).sqrt().clamp_min(1e-12)
    return values / norms.index_select(0, image_of_row)


def active_counts(x: FeatureMap, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``[B]``: the number of active sites of each image at ``x``'s stride (>= 1 for a valid mask)."""
    counts = x.mask.cached(("active-counts", x.stride), lambda: x.mask.dense_at(x.stride).flatten(1).sum(1))
    return counts.to(dtype or x.data.dtype)


@singledispatch
def image_sums(x: FeatureMap, values: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, C]``: per image, the sum over its active sites of ``values`` (default ``x.data``), a
    tensor laid out like ``x.data`` and zero at masked sites."""
    raise TypeError(f"no per-image reduction registered for {type(x).__name__}")


@image_sums.register
def _(x: MaskedDense, values: Optional[torch.Tensor] = None) -> torch.Tensor:
    data = x.data if values is None else values
    return data.sum(dim=(2, 3), dtype=statistics_dtype(data.dtype))


@image_sums.register
def _(x: SparseRows, values: Optional[torch.Tensor] = None) -> torch.Tensor:
    rows = x.data if values is None else values
    return sum_per_image(rows.to(statistics_dtype(rows.dtype)), x.mask.coords_at(x.stride)[:, 0], x.mask.batch_size)


@singledispatch
def per_site_values(x: FeatureMap, values: torch.Tensor) -> torch.Tensor:
    """``values [B, C]`` of each active site's image, laid out like ``x.data``; zero at masked sites."""
    raise TypeError(f"no per-image broadcast registered for {type(x).__name__}")


@per_site_values.register
def _(x: MaskedDense, values: torch.Tensor) -> torch.Tensor:
    return values[:, :, None, None] * x.mask.dense_at(x.stride).to(values.dtype)


@per_site_values.register
def _(x: SparseRows, values: torch.Tensor) -> torch.Tensor:
    return values.index_select(0, x.mask.coords_at(x.stride)[:, 0])


@singledispatch
def image_softmax(x: FeatureMap, logits: torch.Tensor) -> torch.Tensor:
    """Softmax of one logit per site (``logits`` laid out like ``x.data`` with one channel) over each
    image's ACTIVE sites, in at least fp32; zero at masked sites (and in an image without active sites).
    Each image's own maximum is subtracted first, so one image's scale cannot underflow another's."""
    raise TypeError(f"no per-image softmax registered for {type(x).__name__}")


@image_softmax.register
def _(x: MaskedDense, logits: torch.Tensor) -> torch.Tensor:
    site = x.mask.dense_at(x.stride)
    # an "image" without active sites (a patch position of MobileViT-V2's, :mod:`..models.mobilevit`) would
    # softmax over nothing (NaN, in the backward too): its logits stay finite and its scores are zeroed
    hidden = ~site & site.flatten(1).any(1).view(-1, 1, 1, 1)
    flat = logits.to(statistics_dtype(logits.dtype)).masked_fill(hidden, float("-inf")).flatten(1)
    return flat.softmax(dim=1).view_as(logits) * site


@image_softmax.register
def _(x: SparseRows, logits: torch.Tensor) -> torch.Tensor:
    image_of_row = x.mask.coords_at(x.stride)[:, 0]
    values = logits.to(statistics_dtype(logits.dtype))
    peaks = values.new_full((x.mask.batch_size, 1), float("-inf")).scatter_reduce(
        0, image_of_row.unsqueeze(1), values, reduce="amax", include_self=True)
    exps = (values - peaks.index_select(0, image_of_row)).exp()
    totals = sum_per_image(exps, image_of_row, x.mask.batch_size)
    return exps / totals.index_select(0, image_of_row)


def image_means(x: FeatureMap) -> torch.Tensor:
    """``[B, C]``: each image's mean over its active sites (SparK issue 54's global average pool)."""
    sums = image_sums(x)
    return sums / active_counts(x, sums.dtype).unsqueeze(1)


def scale_per_image(x: FeatureMap, factors: torch.Tensor) -> FeatureMap:
    """``x`` times a per-image, per-channel factor ``[B, C]`` (a squeeze-excitation gate).

    Masked sites stay exactly zero: they are zero in ``x`` and only multiplied.
    """
    return x.with_data(x.data * per_site_values(x, factors.to(x.data.dtype)))
