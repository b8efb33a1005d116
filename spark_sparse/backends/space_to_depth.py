"""Space-to-depth (TResNet's stem): each ``b x b`` block of a map becomes one site with ``b * b`` times
the channels.

SparK's masks are patch masks, so a site at stride ``s * b`` is active exactly when every one of the
``b x b`` sites it gathers at stride ``s`` is, as long as ``s * b`` is at most the patch size. The
rearranged masked map is then zero exactly at the masked sites of the coarser grid: the masked map
of the rearranged features. ``masked`` runs timm's rearrangement on the dense map (and masks the
output at the new stride, SparK's rule for every layer); the sparse backends gather each active
coarse site's ``b x b`` rows through a neighbour table (a ``b x b`` window at stride ``b``, taps in
row-major order) and lay them side by side, timm's channel order ``(dy * b + dx) * C + c``.

timm's layer takes maps whose sides are multiples of ``b`` only; the layer refuses an output stride
beyond the patch size, where one coarse site would mix visible and masked pixels.
"""
from __future__ import annotations

from timm.layers import SpaceToDepth

from ..features import FeatureMap, MaskedDense, SparseRows
from ..kernels.gather import table_taps

__all__ = ["MaskedSpaceToDepth", "SparseSpaceToDepth"]


def _output_stride(x: FeatureMap, block_size: int, name: str) -> int:
    """The stride of the rearranged map, refusing grids the rearrangement does not tile or that pass the patch."""
    stride = x.stride * block_size
    height, width = x.mask.map_hw(x.stride)
    if height % block_size or width % block_size:
        raise ValueError(f"{name}: space-to-depth by {block_size} needs map sides that are multiples of "
                         f"{block_size}, got {height}x{width} at stride {x.stride}")
    if stride > x.mask.downsample_ratio:
        raise ValueError(f"{name}: space-to-depth to stride {stride} would put visible and masked pixels in one "
                         f"site (SparK's patches are {x.mask.downsample_ratio} px)")
    return stride


class _SpaceToDepth(SpaceToDepth):
    def __init__(self, block_size: int = 4, name: str = ""):
        super().__init__(block_size)
        self.layer_name = name

    def extra_repr(self) -> str:
        return f"block_size={self.bs}"

    @classmethod
    def from_dense(cls, backend, module: SpaceToDepth, name: str = "") -> "_SpaceToDepth":
        return cls(module.bs, name)


class MaskedSpaceToDepth(_SpaceToDepth):
    """timm's rearrangement of the masked map, output masked at the coarser stride (SparK's way)."""

    def forward(self, x: MaskedDense) -> MaskedDense:
        stride = _output_stride(x, self.bs, self.layer_name)
        return MaskedDense(super().forward(x.data) * x.mask.dense_at(stride), x.mask, stride)

    def describe_execution(self, device, dtype) -> str:
        return "dense space-to-depth x mask (torch)"


class SparseSpaceToDepth(_SpaceToDepth):
    """Each active coarse site's ``b x b`` rows, side by side in timm's channel order."""

    def forward(self, x: SparseRows) -> SparseRows:
        stride = _output_stride(x, self.bs, self.layer_name)
        block = (self.bs, self.bs)
        table = x.mask.neighbour_table(x.stride, stride, block, (0, 0), (1, 1))    # [N_out, b * b]
        taps = table_taps(x.data, table)                                           # [N_out, b * b, C]
        return SparseRows(taps.reshape(taps.shape[0], -1), x.mask, stride)

    def describe_execution(self, device, dtype) -> str:
        return "gather     space-to-depth (block rows side by side)"
