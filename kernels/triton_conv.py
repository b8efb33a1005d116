"""``triton``: implicit-GEMM sparse convolution in Triton, for CUDA.

The same gather-GEMM as :mod:`.gemm`, but the gather happens inside the GEMM: each program loads a
tile of output rows' neighbour-table entries, gathers the input rows under one tap straight from
global memory into registers (masked loads read the zeros of masked sites and padding, so no padded
copy of the rows and no ``[N_out, K*C]`` tap matrix is ever written) and feeds ``tl.dot``. The
programs are in :mod:`._triton_kernels`; this module makes them ``torch.library`` custom ops with
autograd and fake implementations, and registers the kernel:

- forward ``[N_in, C] -> [N_out, O]``: ``out[n] = sum_k X[table[n, k]] W_k`` (``W_k = W[:, :, ky, kx]^T``);
- input gradient: the same program on ``grad_out`` through the transposed table
  (:func:`~spark_sparse.kernels.gemm.transposed_table`, ``[N_in, K]``: the output row each (input
  row, tap) feeds) with ``W_k^T``; for strided convs, where most of those entries are empty, a tile
  skips the taps that feed nothing;
- weight gradient: per tap ``X_k^T grad_out`` with the row reduction split over programs and the
  partial sums added afterwards (fp32, deterministic: no atomics);
- depthwise (``groups == C == O``, ConvNeXt's 7x7 and any ``k``): per-tap multiply-adds of gathered
  rows, its input gradient through the transposed table, its weight gradient a split row reduction
  per (tap, channel).

1x1 stride-1 convs are a plain GEMM on the rows and go to cuBLAS (``torch.matmul``); a Triton
GEMM would not beat it.

Precision: every product is accumulated in fp32; outputs are in the input dtype (fp32, bf16, fp16).
fp32 ``tl.dot`` uses ``input_precision="ieee"`` (exact fp32, like the ``masked`` reference computed
without TF32) unless the user opted into TF32 for matmuls the standard PyTorch way,
``torch.set_float32_matmul_precision("high")`` (or ``"medium"``), which also governs cuBLAS.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._optional import OptionalLibrary
from ._rowmatmul import rows_times_weight
from .base import ConvCall, SparseConvKernel
from .gemm import transposed_table
from .registry import register_kernel

__all__ = ["TRITON", "TritonKernel", "triton_gather_gemm_conv", "triton_depthwise_conv", "uses_tf32"]


def _import_programs():
    from . import _triton_kernels     # compiles nothing yet; @triton.jit reads TRITON_INTERPRET here
    return _triton_kernels


TRITON = OptionalLibrary("triton", _import_programs,
                         "install it with `pip install triton` (Linux CUDA wheels of torch bring it)")


def uses_tf32() -> bool:
    """Whether fp32 products may use TF32 tensor cores: PyTorch's matmul precision setting decides."""
    return torch.get_float32_matmul_precision() != "highest"


def _programs(*tensors: torch.Tensor):
    """The Triton programs, once the tensors are where they can run (CUDA, or the CPU interpreter)."""
    programs = TRITON.get()
    for t in tensors:
        if t.device.type != "cuda" and not programs.INTERPRETED:
            raise RuntimeError(f"the triton kernel runs on CUDA tensors, got a {t.device.type} tensor; on a CPU "
                               "Triton runs only under its interpreter (TRITON_INTERPRET=1 set before triton is "
                               "imported), which is for tests. Use --backend=sparse on this machine")
    return programs


def _taps_in_out(weight: torch.Tensor) -> torch.Tensor:
    """``[O, C, kh, kw]`` -> ``[K, C, O]``: per tap, the matrix the gathered rows multiply."""
    out_ch, in_ch, kh, kw = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(kh * kw, in_ch, out_ch).contiguous()


def _taps_out_in(weight: torch.Tensor) -> torch.Tensor:
    """``[O, C, kh, kw]`` -> ``[K, O, C]``: per tap, the transposed matrix the input gradient needs."""
    out_ch, in_ch, kh, kw = weight.shape
    return weight.permute(2, 3, 0, 1).reshape(kh * kw, out_ch, in_ch).contiguous()


def _depthwise_taps(weight: torch.Tensor) -> torch.Tensor:
    """``[C, 1, kh, kw]`` -> ``[K, C]``."""
    return weight.reshape(weight.shape[0], -1).t().contiguous()


def _is_strided(table_t: torch.Tensor, grad_out: torch.Tensor) -> bool:
    """A strided conv has fewer output rows than input rows (stride 1 keeps the active set)."""
    return table_t.shape[0] != grad_out.shape[0]


def _check_transposed(table_t: torch.Tensor, table: torch.Tensor) -> None:
    if table_t.shape[0] == 0 and table.shape[0] > 0:
        raise RuntimeError("the input gradient needs the transposed neighbour table, but an empty one was passed "
                           "(TritonKernel.conv builds it when the features require grad)")


# ---------------------------------------------------------------------- ordinary (groups == 1) convs
@torch.library.custom_op("spark_sparse::triton_gather_gemm_conv", mutates_args=())
def triton_gather_gemm_conv(features: torch.Tensor, weight: torch.Tensor, table: torch.Tensor,
                            table_t: torch.Tensor, tf32: bool) -> torch.Tensor:
    """``features [N_in, C]``, ``weight [O, C, kh, kw]``, ``table [N_out, K]`` -> ``[N_out, O]``.

    ``table_t [N_in, K]`` (or empty when no input gradient is wanted) is kept for the backward.
    """
    return _programs(features).gather_gemm(features, table, _taps_in_out(weight), False, tf32)


@triton_gather_gemm_conv.register_fake
def _(features, weight, table, table_t, tf32):
    return features.new_empty(table.shape[0], weight.shape[0])


@torch.library.custom_op("spark_sparse::triton_gather_gemm_conv_grad_input", mutates_args=())
def triton_gather_gemm_conv_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, table_t: torch.Tensor,
                                       tf32: bool) -> torch.Tensor:
    """``grad_out [N_out, O]`` -> ``[N_in, C]`` through the transposed table ``[N_in, K]``."""
    return _programs(grad_out).gather_gemm(grad_out, table_t, _taps_out_in(weight), _is_strided(table_t, grad_out),
                                           tf32)


@triton_gather_gemm_conv_grad_input.register_fake
def _(grad_out, weight, table_t, tf32):
    return grad_out.new_empty(table_t.shape[0], weight.shape[1])


@torch.library.custom_op("spark_sparse::triton_gather_gemm_conv_grad_weight", mutates_args=())
def triton_gather_gemm_conv_grad_weight(grad_out: torch.Tensor, features: torch.Tensor, weight: torch.Tensor,
                                        table: torch.Tensor, tf32: bool) -> torch.Tensor:
    """``[O, C, kh, kw]`` in the weight's dtype (reduced in fp32)."""
    grad_kco = _programs(features).gather_gemm_weight_grad(grad_out, features, table, tf32)     # [K, C, O]
    return grad_kco.permute(2, 1, 0).reshape(weight.shape).to(weight.dtype)


@triton_gather_gemm_conv_grad_weight.register_fake
def _(grad_out, features, weight, table, tf32):
    return torch.empty_like(weight)


def _setup(ctx, inputs, output):
    features, weight, table, table_t = inputs[:4]
    ctx.save_for_backward(features, weight, table, table_t)
    ctx.tf32 = inputs[4] if len(inputs) > 4 else False


def _gemm_backward(ctx, grad_out):
    features, weight, table, table_t = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_in = grad_w = None
    if ctx.needs_input_grad[0]:
        _check_transposed(table_t, table)
        grad_in = triton_gather_gemm_conv_grad_input(grad_out, weight, table_t, ctx.tf32)
    if ctx.needs_input_grad[1]:
        grad_w = triton_gather_gemm_conv_grad_weight(grad_out, features, weight, table, ctx.tf32)
    return grad_in, grad_w, None, None, None


triton_gather_gemm_conv.register_autograd(_gemm_backward, setup_context=_setup)


# ---------------------------------------------------------------------- depthwise convs
@torch.library.custom_op("spark_sparse::triton_depthwise_conv", mutates_args=())
def triton_depthwise_conv(features: torch.Tensor, weight: torch.Tensor, table: torch.Tensor,
                          table_t: torch.Tensor) -> torch.Tensor:
    """``features [N_in, C]``, ``weight [C, 1, kh, kw]``, ``table [N_out, K]`` -> ``[N_out, C]``."""
    return _programs(features).depthwise(features, table, _depthwise_taps(weight))


@triton_depthwise_conv.register_fake
def _(features, weight, table, table_t):
    return features.new_empty(table.shape[0], features.shape[1])


@torch.library.custom_op("spark_sparse::triton_depthwise_conv_grad_input", mutates_args=())
def triton_depthwise_conv_grad_input(grad_out: torch.Tensor, weight: torch.Tensor,
                                     table_t: torch.Tensor) -> torch.Tensor:
    """``grad_out [N_out, C]`` -> ``[N_in, C]``: the same per-tap products through the transposed table."""
    return _programs(grad_out).depthwise(grad_out, table_t, _depthwise_taps(weight))


@triton_depthwise_conv_grad_input.register_fake
def _(grad_out, weight, table_t):
    return grad_out.new_empty(table_t.shape[0], grad_out.shape[1])


@torch.library.custom_op("spark_sparse::triton_depthwise_conv_grad_weight", mutates_args=())
def triton_depthwise_conv_grad_weight(grad_out: torch.Tensor, features: torch.Tensor, weight: torch.Tensor,
                                      table: torch.Tensor) -> torch.Tensor:
    """``[C, 1, kh, kw]`` in the weight's dtype (reduced in fp32)."""
    grad_kc = _programs(features).depthwise_weight_grad(grad_out, features, table)           # [K, C]
    return grad_kc.t().reshape(weight.shape).to(weight.dtype)


@triton_depthwise_conv_grad_weight.register_fake
def _(grad_out, features, weight, table):
    return torch.empty_like(weight)


def _depthwise_backward(ctx, grad_out):
    features, weight, table, table_t = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_in = grad_w = None
    if ctx.needs_input_grad[0]:
        _check_transposed(table_t, table)
        grad_in = triton_depthwise_conv_grad_input(grad_out, weight, table_t)
    if ctx.needs_input_grad[1]:
        grad_w = triton_depthwise_conv_grad_weight(grad_out, features, weight, table)
    return grad_in, grad_w, None, None


triton_depthwise_conv.register_autograd(_depthwise_backward, setup_context=_setup)


# ---------------------------------------------------------------------- the kernel
@register_kernel
class TritonKernel(SparseConvKernel):
    NAME = "triton"
    DESCRIPTION = ("Triton implicit-GEMM on CUDA: rows gathered through the neighbour table inside tl.dot tiles; "
                   "transposed-table input grad, split-row weight grad, depthwise kernel; 1x1 s1 on cuBLAS")
    SUPPORTED_DEVICES = frozenset({"cuda"})
    SUPPORTED_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
    SUPPORTED_GROUPS = "depthwise"

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if not torch.cuda.is_available():
            return False, ("no CUDA device is visible to torch; the Triton kernels run on NVIDIA/AMD GPUs "
                           "(TRITON_INTERPRET=1 runs them on the CPU for tests only)")
        available, why = TRITON.availability()
        if not available:
            return False, why
        if TRITON.get().INTERPRETED:
            return False, "TRITON_INTERPRET=1 is set: Triton runs on its CPU interpreter (tests only), not on the GPU"
        return True, ""

    def conv(self, features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             call: ConvCall) -> torch.Tensor:
        if features.dtype != weight.dtype:
            raise TypeError(f"triton kernel: features ({features.dtype}) and weight ({weight.dtype}) must share "
                            "one dtype (SparseConv2d casts both to the autocast dtype)")
        if call.groups > 1 and not call.groups == features.shape[1] == weight.shape[0]:
            raise ValueError(f"triton kernel: groups={call.groups} with {features.shape[1]} input and {weight.shape[0]} "
                             "output channels; it runs groups=1 or depthwise convs only")
        pointwise = weight.shape[-2:] == (1, 1) and call.in_stride == call.out_stride and call.padding == (0, 0)
        if pointwise and call.groups == 1:
            out = rows_times_weight(features, weight)        # a 1x1 conv is a plain GEMM: cuBLAS
        else:
            table = call.neighbours()
            needs_input_grad = torch.is_grad_enabled() and features.requires_grad
            table_t = transposed_table(call) if needs_input_grad else table.new_empty(0, table.shape[1])
            features, weight = features.contiguous(), weight.contiguous()
            if call.groups > 1:
                out = triton_depthwise_conv(features, weight, table, table_t)
            else:
                out = triton_gather_gemm_conv(features, weight, table, table_t, uses_tf32())
        return out if bias is None else out + bias
