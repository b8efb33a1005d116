"""``spconv``: spconv 2.x's gather-GEMM-scatter engine, driven by our own exact rulebooks.

We never call spconv's modules. For each layer we build the rulebook ("indice pairs": for every
kernel tap, the (input row, output row) pairs whose sites are both active) from the mask's
neighbour table, so strided convs produce exactly the downsampled active set (spconv's own
``SparseConv2d`` would add sites across patch edges) and every layer of a stage with the same
geometry reuses the cached rulebook (spconv's ``indice_key`` idea).

On CUDA, spconv's ``indice_conv`` / ``indice_conv_backward`` do the work from our autograd function.
On the CPU, spconv's own algorithm is, per kernel tap: gather the input rows (its C++
``gather_cpu``), one ``torch.mm`` (spconv calls torch for its CPU GEMM), scatter-add into the output
rows (its C++ ``scatter_add_cpu``). That scatter-add has a data race: its OpenMP loop writes through
two pointers declared outside the parallel region and shared by every thread, so with several
threads one thread adds its row into another thread's output row (wrong outputs in most calls at
56x56 with 2 threads; spconv's OpenMP is the process's, so ``torch.set_num_threads`` reaches it).
We therefore run that same algorithm with spconv's gather and the GEMM and scatter-add done by torch
(``index_add_``), in the forward and the backward alike. The process's thread count is never
touched. (spconv's CPU backward also asks for a CUDA stream before it reaches its CPU branch, so it
could not run on a machine without a GPU anyway.) Indices are int32 and contiguous.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._optional import OptionalLibrary
from .base import ConvCall, ConvSpec, SparseConvKernel
from .registry import register_kernel

__all__ = ["SPCONV", "SpconvKernel", "to_native", "from_native", "spconv_rulebook"]


class _Spconv(NamedTuple):
    """The parts of spconv this kernel calls."""

    ops: object          # spconv.pytorch.ops: indice_conv / indice_conv_backward (CUDA)
    gather_cpu: object   # SpconvOps.gather_cpu(out, inp, inds): out[i] = inp[inds[i]] (tensorview tensors)
    to_tv: object        # torch tensor -> tensorview tensor (shares memory; needs a contiguous tensor)


def _import_spconv() -> _Spconv:
    import spconv.pytorch.ops as ops
    from spconv.core_cc.csrc.sparse.all import SpconvOps
    from spconv.pytorch.cppcore import torch_tensor_to_tv
    return _Spconv(ops, SpconvOps.gather_cpu, torch_tensor_to_tv)


SPCONV = OptionalLibrary("spconv", _import_spconv,
                         "install it with `pip install spconv` (CPU) or `pip install spconv-cu126` (CUDA 12)")


def to_native(weight: torch.Tensor) -> torch.Tensor:
    """Dense ``[O, C, kh, kw]`` -> the layout spconv's modules store.

    spconv 2.x keeps KRSC ``[O, kh, kw, C]``, except 1x1 kernels, which its modules use as a
    ``[C, O]`` matrix viewed in the KRSC shape.
    """
    out_ch, in_ch, kh, kw = weight.shape
    if (kh, kw) == (1, 1):
        return weight[:, :, 0, 0].t().contiguous().view(out_ch, 1, 1, in_ch)
    return weight.permute(0, 2, 3, 1).contiguous()


def from_native(native: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_native`: spconv's stored weight -> dense ``[O, C, kh, kw]``."""
    out_ch, kh, kw, in_ch = native.shape
    if (kh, kw) == (1, 1):
        return native.reshape(in_ch, out_ch).t()[:, :, None, None].contiguous()
    return native.permute(0, 3, 1, 2).contiguous()


def spconv_rulebook(call: ConvCall) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indice_pairs [2, K, P] int32, counts [K] int32)`` for ``call``, cached on its mask."""
    key = ("spconv-rulebook", call.in_stride, call.out_stride, call.kernel_size, call.padding, call.dilation)

    def build():
        table = call.neighbours()                              # [N_out, K]
        valid = table < call.num_in
        counts = valid.sum(0)
        k = table.shape[1]
        width = max(int(counts.max()), 1)
        pairs = torch.full((2, k, width), -1, dtype=torch.int32, device=table.device)
        for tap in range(k):
            out_rows = valid[:, tap].nonzero().squeeze(1)
            pairs[0, tap, :out_rows.numel()] = table[out_rows, tap].to(torch.int32)
            pairs[1, tap, :out_rows.numel()] = out_rows.to(torch.int32)
        return pairs.contiguous(), counts.to(torch.int32).contiguous()
    return call.mask.cached(key, build)


class _SpconvConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, weight_krsc, pairs, counts, num_out):
        features = features.contiguous()
        if features.is_cuda:
            out = SPCONV.get().ops.indice_conv(features, weight_krsc, pairs, counts, num_out, False, False)
        else:
            out = _rulebook_forward_cpu(features, weight_krsc, pairs, counts, num_out)
        ctx.save_for_backward(features, weight_krsc, pairs, counts)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        features, weight_krsc, pairs, counts = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        if features.is_cuda:
            grad_in, grad_w = SPCONV.get().ops.indice_conv_backward(features, weight_krsc, grad_out, pairs, counts,
                                                                    False, False)
        else:
            grad_in, grad_w = _rulebook_backward_cpu(features, weight_krsc, grad_out, pairs, counts)
        return grad_in, grad_w, None, None, None


def _gather_rows(buffer: torch.Tensor, source: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``source[rows]`` (``rows`` int32, contiguous) by spconv's CPU gather, into ``buffer``'s first rows.

    spconv's gather is thread-safe (each thread only reads shared state), unlike its scatter-add.
    """
    lib = SPCONV.get()
    out = buffer[:rows.numel()]
    lib.gather_cpu(lib.to_tv(out), lib.to_tv(source), lib.to_tv(rows))
    return out


def _rulebook_forward_cpu(features, weight_krsc, pairs, counts, num_out):
    """spconv's CPU forward: per tap, gather ``[P, C]`` (spconv), GEMM -> ``[P, O]``, scatter-add (torch)."""
    out_ch, kh, kw, in_ch = weight_krsc.shape
    weight = weight_krsc.reshape(out_ch, kh * kw, in_ch)
    out = features.new_zeros(num_out, out_ch)
    counts = counts.tolist()
    buffer = features.new_empty(max(counts, default=0), in_ch)
    for tap, count in enumerate(counts):
        if count == 0:
            continue
        gathered = _gather_rows(buffer, features, pairs[0, tap, :count])
        out.index_add_(0, pairs[1, tap, :count].long(), gathered @ weight[:, tap].t())
    return out


def _rulebook_backward_cpu(features, weight_krsc, grad_out, pairs, counts):
    """spconv's CPU backward: per tap, gather rows (spconv), two GEMMs, scatter-add the input grad (torch)."""
    out_ch, kh, kw, in_ch = weight_krsc.shape
    weight = weight_krsc.reshape(out_ch, kh * kw, in_ch)
    grad_in = torch.zeros_like(features)
    grad_w = torch.zeros_like(weight)
    counts = counts.tolist()
    width = max(counts, default=0)
    grad_buffer, feature_buffer = grad_out.new_empty(width, out_ch), features.new_empty(width, in_ch)
    for tap, count in enumerate(counts):
        if count == 0:
            continue
        rows_in, rows_out = pairs[0, tap, :count], pairs[1, tap, :count]
        g = _gather_rows(grad_buffer, grad_out, rows_out)                       # [P, O]
        grad_w[:, tap] = g.t() @ _gather_rows(feature_buffer, features, rows_in)
        grad_in.index_add_(0, rows_in.long(), g @ weight[:, tap])
    return grad_in, grad_w.view_as(weight_krsc)


@register_kernel
class SpconvKernel(SparseConvKernel):
    NAME = "spconv"
    DESCRIPTION = ("spconv 2.x gather-GEMM-scatter on exact rulebooks built from the mask "
                   "(CPU: spconv's gather, torch GEMM and race-free scatter-add)")
    SUPPORTED_DTYPES = frozenset({torch.float32, torch.float64, torch.float16})   # spconv has no bf16 kernels
    SUPPORTED_GROUPS = "none"                                                       # spconv has no grouped conv

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return SPCONV.availability()

    @classmethod
    def extra_reasons(cls, spec: ConvSpec) -> list[str]:
        if spec.device_type == "cuda" and not torch.cuda.is_available():
            return ["CUDA is not available to torch"]
        return []

    def conv(self, features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             call: ConvCall) -> torch.Tensor:
        pairs, counts = spconv_rulebook(call)
        krsc = weight.permute(0, 2, 3, 1).contiguous()   # what indice_conv computes with (all weights KRSC)
        out = _SpconvConv.apply(features, krsc, pairs, counts, call.num_out)
        return out if bias is None else out + bias
