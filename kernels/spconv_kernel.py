"""``spconv``: spconv 2.x's gather-GEMM-scatter engine, driven by our own exact rulebooks.

We never call spconv's modules. For each layer we build the rulebook ("indice pairs": for every
kernel tap, the (input row, output row) pairs whose sites are both active) from the mask's
neighbour table, so strided convs produce exactly the downsampled active set (spconv's own
``SparseConv2d`` would add sites across patch edges) and every layer of a stage with the same
geometry reuses the cached rulebook (spconv's ``indice_key`` idea). Then spconv's
``indice_conv`` / ``indice_conv_backward`` do the work from our autograd function.

CPU traps handled here (see FACTS.md): the CPU scatter-add races under several OpenMP threads, so
spconv's CPU ops run with one thread (restored afterwards); indices are int32 and contiguous.
spconv's CPU backward asks for a CUDA stream before it reaches its CPU branch, so on the CPU the
backward runs that same algorithm (per tap: gather, GEMM, scatter-add) with torch ops on the same
rulebook; on CUDA it is spconv's own ``indice_conv_backward``.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ._optional import OptionalLibrary
from .base import ConvCall, ConvSpec, SparseConvKernel
from .registry import register_kernel

__all__ = ["SPCONV", "SpconvKernel", "to_native", "from_native", "spconv_rulebook"]

def _import_spconv_ops():
    import spconv.pytorch.ops as ops
    return ops


SPCONV = OptionalLibrary("spconv", _import_spconv_ops,
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


@contextlib.contextmanager
def _single_thread_on_cpu(device: torch.device):
    """spconv's CPU scatter-add is not thread-safe: run it on one thread, then restore."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _SpconvConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, weight_krsc, pairs, counts, num_out):
        features = features.contiguous()
        with _single_thread_on_cpu(features.device):
            out = SPCONV.get().indice_conv(features, weight_krsc, pairs, counts, num_out, False, False)
        ctx.save_for_backward(features, weight_krsc, pairs, counts)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        features, weight_krsc, pairs, counts = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        if features.is_cuda:
            grad_in, grad_w = SPCONV.get().indice_conv_backward(features, weight_krsc, grad_out, pairs, counts, False, False)
        else:
            grad_in, grad_w = _rulebook_backward_cpu(features, weight_krsc, grad_out, pairs, counts)
        return grad_in, grad_w, None, None, None


def _rulebook_backward_cpu(features, weight_krsc, grad_out, pairs, counts):
    """spconv's CPU backward algorithm on torch ops: per tap, gather rows, two GEMMs, scatter-add."""
    out_ch, kh, kw, in_ch = weight_krsc.shape
    weight = weight_krsc.reshape(out_ch, kh * kw, in_ch)
    grad_in = torch.zeros_like(features)
    grad_w = torch.zeros_like(weight)
    for tap, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        rows_in = pairs[0, tap, :count].long()
        rows_out = pairs[1, tap, :count].long()
        g = grad_out.index_select(0, rows_out)                       # [P, O]
        grad_w[:, tap] = g.t() @ features.index_select(0, rows_in)
        grad_in.index_add_(0, rows_in, g @ weight[:, tap])
    return grad_in, grad_w.view_as(weight_krsc)


@register_kernel
class SpconvKernel(SparseConvKernel):
    NAME = "spconv"
    DESCRIPTION = "spconv 2.x gather-GEMM-scatter on exact rulebooks built from the mask"
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
