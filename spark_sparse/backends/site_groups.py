"""A map's sites regrouped into tiles, as a feature map of its own: MobileViT's patch positions, window
attention's windows (DaViT, Twins-SVT, Swin's shifted windows).

Some blocks cut a ``H x W`` map into ``th x tw`` tiles and run a layer per group of sites: MobileViT
per position ``(dy, dx)`` inside the tiles (every tile's site at that position: one token sequence
over the ``H / th x W / tw`` tile grid), window attention per tile (its ``th x tw`` sites). Swin's
shifted windows tile the map rolled by ``-shift`` (``torch.roll``, cyclic), so a window gathers sites
from the map's opposite borders. Either way the groups are "images" of a mask of their own
(:class:`~spark_sparse.mask.ActiveMask`), active where the original site is, so every per-image layer
of this package (attention among each image's active tokens, per-image softmax and sums) runs per
group unchanged:

- ``masked``: the dense map rolled, reshaped and permuted as timm does it;
- sparse rows: one ``index_select`` permutation each way (roll and regrouping composed; built once per
  mask and cached).

A map that the tiles do not cover exactly is refused: timm pads or interpolates it, which puts tokens
that are not the image's sites into the groups.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..features import FeatureMap, MaskedDense, SparseRows, UnsupportedFeatureOperation
from ..mask import ActiveMask

__all__ = ["SiteGroups", "attention_windows"]

#: the dims of a site grid viewed as ``[B, nh, th, nw, tw]`` (tile row, row in tile, tile column, column in tile)
_BATCH, _TILE_ROW, _IN_ROW, _TILE_COL, _IN_COL = range(5)


class SiteGroups:
    """The sites of a map at ``stride`` cut into ``tile`` tiles and regrouped: ``by_position`` one group per
    (image, position in the tile) over the tile grid, else one group per (image, tile) over the tile's sites.
    ``shift`` ``(sy, sx)``: the tiles cut the map rolled by ``(-sy, -sx)`` (Swin's shifted windows).

    ``mask``: one "image" per group (stride 1 of its own mask, groups in timm's order); ``to_groups`` /
    ``from_groups``: the row orders of the two maps (sparse rows).
    """

    def __init__(self, mask: ActiveMask, stride: int, tile: tuple[int, int], by_position: bool,
                 shift: tuple[int, int] = (0, 0)):
        self.shift = tuple(shift)
        site = self._roll(mask.dense_at(stride)[:, 0], backward=False)
        batch, height, width = site.shape
        th, tw = tile
        nh, nw = height // th, width // tw
        if by_position:                                      # groups (b, dy, dx) over the (nh, nw) tile grid
            self._order = (_BATCH, _IN_ROW, _IN_COL, _TILE_ROW, _TILE_COL)
            self._group_shape, self.grid = (th, tw), (nh, nw)
        else:                                                # groups (b, i, j) over the (th, tw) sites of a tile
            self._order = (_BATCH, _TILE_ROW, _TILE_COL, _IN_ROW, _IN_COL)
            self._group_shape, self.grid = (nh, nw), (th, tw)
        self._tiled = (nh, th, nw, tw)
        # the same order on dense data [B, C, nh, th, nw, tw]: groups first, then channels, then the grid
        self._data_order = (0, self._order[1] + 1, self._order[2] + 1, 1, self._order[3] + 1, self._order[4] + 1)
        grouped = self._regroup(site.view(batch, *self._tiled))
        self.mask = ActiveMask(grouped.unsqueeze(1), downsample_ratio=1)
        rows = self._regroup(self._roll(mask.index_grid(stride), backward=False).view(batch, *self._tiled))
        self.to_groups = rows[grouped]                       # row-major over (group, y, x): the new map's rows
        self.from_groups = torch.empty_like(self.to_groups).scatter_(
            0, self.to_groups, torch.arange(self.to_groups.shape[0], device=self.to_groups.device))

    def _roll(self, grid: torch.Tensor, backward: bool) -> torch.Tensor:
        """A map ``[..., H, W]`` rolled by ``-shift`` (the tiles' frame), or ``backward`` by ``+shift``."""
        if not any(self.shift):
            return grid
        sign = 1 if backward else -1
        return torch.roll(grid, shifts=(sign * self.shift[0], sign * self.shift[1]), dims=(-2, -1))

    def _regroup(self, tiled: torch.Tensor) -> torch.Tensor:
        """``[B, nh, th, nw, tw]`` -> ``[groups, *grid]``."""
        return tiled.permute(self._order).reshape(-1, *self.grid)

    @classmethod
    def of(cls, x: FeatureMap, tile: tuple[int, int], by_position: bool, refusal: Callable[[str], str],
           shift: tuple[int, int] = (0, 0)) -> "SiteGroups":
        """The grouping of ``x``'s sites (cached on its mask). A map the tiles do not cover is refused with
        ``refusal(what)``, ``what`` saying which map and tiles."""
        height, width = x.mask.map_hw(x.stride)
        if height % tile[0] or width % tile[1]:
            raise UnsupportedFeatureOperation(refusal(
                f"its {height}x{width} map at stride {x.stride} does not tile by the {tile[0]}x{tile[1]} "
                f"{'patches' if by_position else 'windows'}"))
        key = ("site-groups", x.stride, tuple(tile), by_position, tuple(shift))
        return x.mask.cached(key, lambda: cls(x.mask, x.stride, tile, by_position, shift))

    def unfold(self, x: FeatureMap) -> FeatureMap:
        """``x`` as a map of the groups."""
        if isinstance(x, MaskedDense):
            batch, channels = x.data.shape[:2]
            data = self._roll(x.data, backward=False).reshape(batch, channels, *self._tiled).permute(self._data_order)
            return MaskedDense(data.reshape(-1, channels, *self.grid), self.mask, 1)
        return SparseRows(x.data.index_select(0, self.to_groups), self.mask, 1)

    def fold(self, groups: FeatureMap, like: FeatureMap) -> FeatureMap:
        """A map of the groups back on the sites of ``like`` (its inverse of :meth:`unfold`)."""
        if isinstance(groups, MaskedDense):
            channels = groups.data.shape[1]
            nh, th, nw, tw = self._tiled
            data = groups.data.view(-1, *self._group_shape, channels, *self.grid)    # [B, g1, g2, C, k1, k2]
            inverse = tuple(self._data_order.index(d) for d in range(6))
            data = data.permute(inverse).reshape(-1, channels, nh * th, nw * tw)
            return MaskedDense(self._roll(data, backward=True), like.mask, like.stride)
        return SparseRows(groups.data.index_select(0, self.from_groups), like.mask, like.stride)


def attention_windows(x: FeatureMap, window: tuple[int, int], layer_name: str, own_sizes: str,
                      shift: tuple[int, int] = (0, 0)) -> SiteGroups:
    """The ``window`` windows of window attention over ``x``'s sites (DaViT, Twins-SVT, Swin; ``shift``: Swin's
    shifted windows). timm pads a map that its windows do not tile with zero tokens that take part in the
    attention (their keys are the qkv bias): refused, naming the input sides that tile every block's windows
    (multiples of the patch size times the window: every map is at a stride up to the patch size) and
    ``own_sizes`` (the family's own input size, e.g. "DaViT's own, 224, tiles every block"). Sides that tile
    only the failing block would fail again at the next stride."""
    def refusal(what: str) -> str:
        sides = [x.mask.downsample_ratio * extent for extent in window]
        multiple = f"{sides[0]}" if sides[0] == sides[1] else f"{sides[0]} (height) and {sides[1]} (width)"
        return (f"{layer_name}: {what}, which timm pads with zero tokens that take part in the attention; use an "
                f"input size that is a multiple of {multiple} ({own_sizes})")
    return SiteGroups.of(x, window, by_position=False, refusal=refusal, shift=shift)
