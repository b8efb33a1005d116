"""``gather``: the reference sparse convolution in plain PyTorch, for every device, dtype and shape.

For each active output site it gathers the input rows under every kernel tap through the mask's
dense index grid (masked and padding taps read a zero row) and contracts them with the weight:
one GEMM ``[N_out, K*C] x [K*C, O]`` for ordinary convs (a plain GEMM on the rows for 1x1 ones), a
weighted sum over taps for depthwise ones, a batched GEMM per group otherwise (1x1 included). Autograd provides the backward. It is correct and
dtype-general, not fast: the fast kernels live beside it.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import ConvCall, SparseConvKernel
from .registry import register_kernel

__all__ = ["GatherKernel", "gather_taps", "rows_at", "table_taps", "with_zero_rows"]


def rows_at(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``source[index]`` for an index of any shape, through ``index_select``.

    Not ``source[index]``: the backward of advanced indexing is an accumulating ``index_put``, and on
    the CPU its threads add a row that several of them address in a different order on every run
    (a random ``[N, 9]`` table, two threads: 20 different input gradients in 20 runs), which breaks
    bit-exact resume; ``index_select``'s backward (``index_add``) adds in one order. Its forward is
    also faster here (about 3x for ``[N, 9]`` tables of 64-256 channels).
    """
    return source.index_select(0, index.reshape(-1)).view(*index.shape, *source.shape[1:])


def with_zero_rows(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` and the two zero rows a neighbour table addresses: ``N`` for masked taps, ``N + 1`` for padding."""
    return torch.cat([rows, rows.new_zeros(2, rows.shape[1])])


def table_taps(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``[*table.shape, C]``: the row under each entry of a neighbour table, zero for masked and padding taps."""
    return rows_at(with_zero_rows(rows), table)


def gather_taps(features: torch.Tensor, call: ConvCall) -> torch.Tensor:
    """``[N_out, K, C]``: the input row under each tap, zero over masked sites and padding."""
    return table_taps(features, call.neighbours())


@register_kernel
class GatherKernel(SparseConvKernel):
    NAME = "gather"
    DESCRIPTION = "PyTorch gather over a dense index grid + GEMM (reference, any shape)"

    def conv(self, features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             call: ConvCall) -> torch.Tensor:
        out_ch, cin_per_group, kh, kw = weight.shape
        if (kh, kw) == (1, 1) and call.in_stride == call.out_stride and call.padding == (0, 0) and call.groups == 1:
            out = features @ weight.view(out_ch, -1).t()          # a 1x1 conv is a GEMM on active rows
        else:
            taps = gather_taps(features, call)                        # [N, K, C]
            n, k, c = taps.shape
            g = call.groups
            if g == 1:
                out = taps.reshape(n, k * c) @ weight.permute(0, 2, 3, 1).reshape(out_ch, k * c).t()
            elif g == c == out_ch:
                out = torch.einsum("nkc,ck->nc", taps, weight.view(c, k))
            else:
                grouped = taps.view(n, k, g, cin_per_group)
                w = weight.view(g, out_ch // g, cin_per_group, k)
                out = torch.einsum("nkgc,gock->ngo", grouped, w).reshape(n, out_ch)
        if bias is not None:
            out = out + bias
        return out
