"""``gemm``: gather-GEMM sparse convolution whose backward is gathers and GEMMs too (no scatter).

Forward, for every active output site: gather the input rows under all taps through the mask's
neighbour table (masked and padding taps read a zero row) and multiply ``[N_out, K*C]`` by the
weight ``[K*C, O]``; 1x1 stride-1 convs are a plain GEMM on the rows.

Backward, the part autograd does slowly (an index_put scatter-add over ``[N_out, K*C]``): for
stride-1 convs ``grad_input`` is the transposed convolution, which is again a gather: each (input
row, tap) feeds exactly one output row, recorded in a transposed table ``[N_in, K]`` built once per
mask, so ``grad_input = gather(grad_out)[N_in, K*O] x W[K*O, C]``. Strided convs, where most
(input row, tap) pairs feed nothing, use one GEMM over the outputs and a single ``index_add_``. ``grad_weight = grad_out^T x taps`` with
the taps gathered again rather than kept (less memory). Depthwise convs use per-tap
multiply-adds instead of GEMMs; other grouped convs (ResNeXt, RegNet) one batched GEMM over the
groups (``[G, N, K*C/G] x [G, K*C/G, O/G]``) in forward and in both backward products.

The ops are ``torch.library`` custom ops (``spark_sparse::gather_gemm_conv``,
``spark_sparse::gather_grouped_conv``, ``spark_sparse::gather_depthwise_conv``) with autograd and fake implementations, so autograd and
``torch.compile`` treat them as single ops.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._rowmatmul import rows_times_weight, rows_times_weight_backward
from .base import ConvCall, SparseConvKernel
from .gather import table_taps, with_zero_rows
from .registry import register_kernel

__all__ = ["GemmKernel", "transposed_table", "gather_gemm_conv", "gather_grouped_conv", "gather_depthwise_conv"]


def _taps_major(weight: torch.Tensor) -> torch.Tensor:
    """``[O, C, kh, kw]`` -> ``[O, kh*kw*C]``, matching the gathered taps' layout."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def transposed_table(call: ConvCall) -> torch.Tensor:
    """``[N_in, K]``: the output row each (input row, tap) contributes to, ``N_out`` where none."""
    key = ("transposed-table", call.in_stride, call.out_stride, call.kernel_size, call.padding, call.dilation)

    def build():
        table = call.neighbours()
        n_out, k = table.shape
        valid = table < call.num_in
        out_rows = torch.arange(n_out, device=table.device).unsqueeze(1).expand(n_out, k)
        taps = torch.arange(k, device=table.device).unsqueeze(0).expand(n_out, k)
        result = torch.full((call.num_in, k), n_out, dtype=torch.long, device=table.device)
        result[table[valid], taps[valid]] = out_rows[valid]
        return result
    return call.mask.cached(key, build)


# ---------------------------------------------------------------------- ordinary (groups == 1) convs
@torch.library.custom_op("spark_sparse::gather_gemm_conv", mutates_args=())
def gather_gemm_conv(features: torch.Tensor, weight: torch.Tensor, table: torch.Tensor,
                     table_t: torch.Tensor) -> torch.Tensor:
    taps = table_taps(features, table).flatten(1)    # [N_out, K*C]
    return rows_times_weight(taps, _taps_major(weight))


@gather_gemm_conv.register_fake
def _(features, weight, table, table_t):
    return features.new_empty(table.shape[0], weight.shape[0])


@torch.library.custom_op("spark_sparse::gather_gemm_conv_grad_input", mutates_args=())
def gather_gemm_conv_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, table: torch.Tensor,
                                table_t: torch.Tensor) -> torch.Tensor:
    out_ch, in_ch, kh, kw = weight.shape
    n_in, n_out = table_t.shape[0], table.shape[0]
    if n_in == n_out:
        # stride 1: every (input row, tap) has its output row, so the transposed conv is a gather-GEMM
        grad_taps = table_taps(grad_out, table_t).flatten(1)     # [N_in, K*O]
        return rows_times_weight(grad_taps, weight.permute(1, 2, 3, 0).reshape(in_ch, kh * kw * out_ch))
    # strided: most (input row, tap) pairs feed no output; a GEMM over the outputs and one
    # scatter-add costs a fraction of the transposed gather's mostly-zero GEMM
    grad_taps = rows_times_weight(grad_out, _taps_major(weight).t())          # [N_out, K*C]
    grad_in = grad_out.new_zeros(n_in + 2, in_ch)
    grad_in.index_add_(0, table.reshape(-1), grad_taps.reshape(-1, in_ch))
    return grad_in[:n_in]


@gather_gemm_conv_grad_input.register_fake
def _(grad_out, weight, table, table_t):
    return grad_out.new_empty(table_t.shape[0], weight.shape[1])


@torch.library.custom_op("spark_sparse::gather_gemm_conv_grad_weight", mutates_args=())
def gather_gemm_conv_grad_weight(grad_out: torch.Tensor, features: torch.Tensor, weight: torch.Tensor,
                                 table: torch.Tensor) -> torch.Tensor:
    out_ch, in_ch, kh, kw = weight.shape
    taps = table_taps(features, table).flatten(1)    # gathered again, not kept
    _, grad_w = rows_times_weight_backward(grad_out, taps, _taps_major(weight), False, True)
    return grad_w.view(out_ch, kh, kw, in_ch).permute(0, 3, 1, 2).contiguous()


@gather_gemm_conv_grad_weight.register_fake
def _(grad_out, features, weight, table):
    return torch.empty_like(weight)


def _gemm_setup(ctx, inputs, output):
    features, weight, table, table_t = inputs
    ctx.save_for_backward(features, weight, table, table_t)


def _gemm_backward(ctx, grad_out):
    features, weight, table, table_t = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_in = gather_gemm_conv_grad_input(grad_out, weight, table, table_t) if ctx.needs_input_grad[0] else None
    grad_w = gather_gemm_conv_grad_weight(grad_out, features, weight, table) if ctx.needs_input_grad[1] else None
    return grad_in, grad_w, None, None


gather_gemm_conv.register_autograd(_gemm_backward, setup_context=_gemm_setup)


# ---------------------------------------------------------------------- grouped convs (not depthwise)
def _grouped_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``[O, C/G, kh, kw]`` -> ``[G, K*C/G, O/G]``, matching the grouped taps' ``(tap, channel)`` layout."""
    out_ch, cin_g, kh, kw = weight.shape
    return weight.view(groups, out_ch // groups, cin_g, kh * kw).permute(0, 3, 2, 1).reshape(
        groups, kh * kw * cin_g, out_ch // groups)


def _grouped_taps(rows: torch.Tensor, table: torch.Tensor, groups: int) -> torch.Tensor:
    """``[G, N_out, K*C/G]``: each group's channels of the rows under every tap (zero rows included)."""
    n, k = table.shape
    taps = table_taps(rows, table).view(n, k, groups, rows.shape[1] // groups)
    return taps.permute(2, 0, 1, 3).flatten(2)


@torch.library.custom_op("spark_sparse::gather_grouped_conv", mutates_args=())
def gather_grouped_conv(features: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, table_t: torch.Tensor,
                        groups: int) -> torch.Tensor:
    out = torch.bmm(_grouped_taps(features, table, groups), _grouped_weight(weight, groups))    # [G, N_out, O/G]
    return out.permute(1, 0, 2).reshape(table.shape[0], weight.shape[0])


@gather_grouped_conv.register_fake
def _(features, weight, table, table_t, groups):
    return features.new_empty(table.shape[0], weight.shape[0])


@torch.library.custom_op("spark_sparse::gather_grouped_conv_grad_input", mutates_args=())
def gather_grouped_conv_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, table: torch.Tensor,
                                   table_t: torch.Tensor, groups: int) -> torch.Tensor:
    out_ch, cin_g, kh, kw = weight.shape
    out_g, k = out_ch // groups, kh * kw
    n_in, n_out = table_t.shape[0], table.shape[0]
    w = _grouped_weight(weight, groups)                                                   # [G, K*Cg, Og]
    if n_in == n_out:
        # stride 1: the transposed conv is a gather of the output gradient through the transposed table
        grad_taps = _grouped_taps(grad_out, table_t, groups)                              # [G, N_in, K*Og]
        w_t = w.view(groups, k, cin_g, out_g).transpose(2, 3).reshape(groups, k * out_g, cin_g)
        return torch.bmm(grad_taps, w_t).permute(1, 0, 2).reshape(n_in, groups * cin_g)
    # strided: a GEMM over the outputs, then one scatter-add of every (output row, tap) into its input row
    grad_out_g = grad_out.view(n_out, groups, out_g).transpose(0, 1)                       # [G, N_out, Og]
    grad_taps = torch.bmm(grad_out_g, w.transpose(1, 2)).view(groups, n_out, k, cin_g)     # [G, N_out, K, Cg]
    grad_taps = grad_taps.permute(1, 2, 0, 3).reshape(n_out * k, groups * cin_g)
    grad_in = grad_out.new_zeros(n_in + 2, groups * cin_g)
    grad_in.index_add_(0, table.reshape(-1), grad_taps)
    return grad_in[:n_in]


@gather_grouped_conv_grad_input.register_fake
def _(grad_out, weight, table, table_t, groups):
    return grad_out.new_empty(table_t.shape[0], weight.shape[1] * groups)


@torch.library.custom_op("spark_sparse::gather_grouped_conv_grad_weight", mutates_args=())
def gather_grouped_conv_grad_weight(grad_out: torch.Tensor, features: torch.Tensor, weight: torch.Tensor,
                                    table: torch.Tensor, groups: int) -> torch.Tensor:
    out_ch, cin_g, kh, kw = weight.shape
    grad_out_g = grad_out.view(-1, groups, out_ch // groups).permute(1, 2, 0)              # [G, Og, N_out]
    grad_w = torch.bmm(grad_out_g, _grouped_taps(features, table, groups))               # [G, Og, K*Cg]; taps regathered
    return grad_w.view(groups, out_ch // groups, kh * kw, cin_g).permute(0, 1, 3, 2).reshape(weight.shape).contiguous()


@gather_grouped_conv_grad_weight.register_fake
def _(grad_out, features, weight, table, groups):
    return torch.empty_like(weight)


def _grouped_setup(ctx, inputs, output):
    features, weight, table, table_t, groups = inputs
    ctx.groups = groups
    ctx.save_for_backward(features, weight, table, table_t)


def _grouped_backward(ctx, grad_out):
    features, weight, table, table_t = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_in = (gather_grouped_conv_grad_input(grad_out, weight, table, table_t, ctx.groups)
               if ctx.needs_input_grad[0] else None)
    grad_w = (gather_grouped_conv_grad_weight(grad_out, features, weight, table, ctx.groups)
              if ctx.needs_input_grad[1] else None)
    return grad_in, grad_w, None, None, None


gather_grouped_conv.register_autograd(_grouped_backward, setup_context=_grouped_setup)


# ---------------------------------------------------------------------- depthwise convs
@torch.library.custom_op("spark_sparse::gather_depthwise_conv", mutates_args=())
def gather_depthwise_conv(features: torch.Tensor, weight: torch.Tensor, table: torch.Tensor,
                          table_t: torch.Tensor) -> torch.Tensor:
    padded = with_zero_rows(features)
    w = weight.reshape(weight.shape[0], -1)                                  # [C, K]
    out = padded.index_select(0, table[:, 0]) * w[:, 0]
    for tap in range(1, table.shape[1]):
        out.addcmul_(padded.index_select(0, table[:, tap]), w[:, tap])
    return out


@gather_depthwise_conv.register_fake
def _(features, weight, table, table_t):
    return features.new_empty(table.shape[0], features.shape[1])


@torch.library.custom_op("spark_sparse::gather_depthwise_conv_grad_input", mutates_args=())
def gather_depthwise_conv_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, table_t: torch.Tensor) -> torch.Tensor:
    padded_grad = with_zero_rows(grad_out)
    w = weight.reshape(weight.shape[0], -1)
    grad_in = padded_grad.index_select(0, table_t[:, 0]) * w[:, 0]
    for tap in range(1, table_t.shape[1]):
        grad_in.addcmul_(padded_grad.index_select(0, table_t[:, tap]), w[:, tap])
    return grad_in


@gather_depthwise_conv_grad_input.register_fake
def _(grad_out, weight, table_t):
    return grad_out.new_empty(table_t.shape[0], grad_out.shape[1])


@torch.library.custom_op("spark_sparse::gather_depthwise_conv_grad_weight", mutates_args=())
def gather_depthwise_conv_grad_weight(grad_out: torch.Tensor, features: torch.Tensor, weight: torch.Tensor,
                                      table: torch.Tensor) -> torch.Tensor:
    padded = with_zero_rows(features)
    grad_w = torch.stack([(grad_out * padded.index_select(0, table[:, tap])).sum(0)
                          for tap in range(table.shape[1])], dim=1)
    return grad_w.view_as(weight).contiguous()


@gather_depthwise_conv_grad_weight.register_fake
def _(grad_out, features, weight, table):
    return torch.empty_like(weight)


def _depthwise_backward(ctx, grad_out):
    features, weight, table, table_t = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_in = gather_depthwise_conv_grad_input(grad_out, weight, table_t) if ctx.needs_input_grad[0] else None
    grad_w = gather_depthwise_conv_grad_weight(grad_out, features, weight, table) if ctx.needs_input_grad[1] else None
    return grad_in, grad_w, None, None


gather_depthwise_conv.register_autograd(_depthwise_backward, setup_context=_gemm_setup)


@register_kernel
class GemmKernel(SparseConvKernel):
    NAME = "gemm"
    DESCRIPTION = "gather-GEMM over the dense index grid; backward by transposed-table gathers, no scatter"

    def conv(self, features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             call: ConvCall) -> torch.Tensor:
        pointwise = weight.shape[-2:] == (1, 1) and call.in_stride == call.out_stride and call.padding == (0, 0)
        if pointwise and call.groups == 1:
            out = rows_times_weight(features, weight)            # a 1x1 conv is a GEMM on the active rows
        else:
            table = call.neighbours()
            # the transposed table serves only the input gradient: skip it when none is needed
            # (e.g. the stem, whose input is the image)
            needs_input_grad = torch.is_grad_enabled() and features.requires_grad
            table_t = transposed_table(call) if needs_input_grad else table.new_empty(0, table.shape[1])
            features, weight = features.contiguous(), weight.contiguous()
            if call.groups == 1:
                out = gather_gemm_conv(features, weight, table, table_t)
            elif call.groups == features.shape[1] == weight.shape[0]:
                out = gather_depthwise_conv(features, weight, table, table_t)
            else:
                out = gather_grouped_conv(features, weight, table, table_t, call.groups)
        return out if bias is None else out + bias
