"""Max-pooling over active sites that keeps one byte per output value for backward.

SparK's stem max-pool (3x3, stride 2) runs on the largest feature matrix of a ResNet. Pooling by
``amax`` over gathered taps ``[N_out, K, C]`` makes autograd keep those taps (45 MB for ResNet-50
at batch 16, mask 0.6); this op keeps only the winning tap per output value (``uint8``
``[N_out, C]``, 1.3 MB) and routes the gradient through it, as ``F.max_pool2d`` routes it to its
argmax. Semantics are ``SparseMaxPool2d``'s: masked sites read 0, padding never wins, the first
maximum in row-major tap order wins ties, NaN propagates.

``spark_sparse::gather_max_pool`` is a ``torch.library`` custom op with autograd and fake
implementations.
"""
from __future__ import annotations

import torch

__all__ = ["gather_max_pool", "max_pool_rows"]


def _with_fill_rows(features: torch.Tensor) -> torch.Tensor:
    """Append the rows the table addresses: ``N_in`` masked (0), ``N_in + 1`` padding (-inf)."""
    fill = features.new_tensor([0.0, float("-inf")]).unsqueeze(1).expand(2, features.shape[1])
    return torch.cat([features, fill])


@torch.library.custom_op("spark_sparse::gather_max_pool", mutates_args=())
def gather_max_pool(features: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N_in, C]``, table ``[N_out, K]`` -> (max ``[N_out, C]``, winning tap ``[N_out, C]`` uint8)."""
    if table.shape[1] > 255:
        raise ValueError(f"max-pool window of {table.shape[1]} taps does not fit the uint8 argmax (at most 255)")
    padded = _with_fill_rows(features)
    best = padded.index_select(0, table[:, 0])
    winner = torch.zeros(best.shape, dtype=torch.uint8, device=best.device)
    for tap in range(1, table.shape[1]):
        value = padded.index_select(0, table[:, tap])
        better = (value > best) | (value.isnan() & ~best.isnan())
        best = torch.where(better, value, best)
        winner.masked_fill_(better, tap)
    return best, winner


@gather_max_pool.register_fake
def _(features, table):
    shape = (table.shape[0], features.shape[1])
    return features.new_empty(shape), features.new_empty(shape, dtype=torch.uint8)


@torch.library.custom_op("spark_sparse::gather_max_pool_backward", mutates_args=())
def gather_max_pool_backward(grad_out: torch.Tensor, winner: torch.Tensor, table: torch.Tensor,
                             num_in: int) -> torch.Tensor:
    """Each output value's gradient added to the input row of its winning tap ``[N_in, C]``.

    Overlapping windows add up in at least fp32 (rounded once for bf16/fp16, as ``max_pool2d`` does).
    """
    source = torch.gather(table, 1, winner.long())                                 # [N_out, C] input rows
    accumulate = torch.promote_types(grad_out.dtype, torch.float32)
    grad_in = grad_out.new_zeros(num_in + 2, grad_out.shape[1], dtype=accumulate)
    grad_in.scatter_add_(0, source, grad_out.to(accumulate))
    return grad_in[:num_in].to(grad_out.dtype)


@gather_max_pool_backward.register_fake
def _(grad_out, winner, table, num_in):
    return grad_out.new_empty(num_in, grad_out.shape[1])


def _setup(ctx, inputs, output):
    features, table = inputs
    ctx.save_for_backward(output[1], table)
    ctx.num_in = features.shape[0]


def _backward(ctx, grad_out, grad_winner):
    winner, table = ctx.saved_tensors
    return gather_max_pool_backward(grad_out.contiguous(), winner, table, ctx.num_in), None


gather_max_pool.register_autograd(_backward, setup_context=_setup)


def max_pool_rows(features: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Max over each output's window of ``features`` ``[N_in, C]`` through ``table`` ``[N_out, K]``."""
    return gather_max_pool(features.contiguous(), table)[0]
