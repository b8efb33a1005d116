"""BatchNorm + ReLU on active rows that keeps only the BN input for backward.

Unfused, every conv -> BN -> ReLU -> conv chain keeps two ``[N, C]`` tensors per layer for
backward: BN's input, and ReLU's output (which the next conv keeps as its input too). For a
ResNet-50 at batch 16 that is 240 MB of ReLU outputs beside 280 MB of BN inputs. The ReLU output is
cheap to recompute from the BN input (one statistics pass and one normalise pass over ``[N, C]``,
a fraction of the next conv's GEMM), so :class:`FusedBatchNormReLU` keeps only the BN input, and
hands the next :class:`~spark_sparse.backends.rows.SparseConv2d` rows that know how to recompute
themselves: that conv stores the recipe instead of the rows (saved-tensor hooks scoped to its own
call, see :func:`saved_as_recipe`).

The maths is unchanged bit for bit: the forward is ``torch.native_batch_norm`` (the kernel
``nn.BatchNorm`` runs) followed by ReLU; the recomputation runs the same kernel on the same input,
and the backward is ``native_batch_norm_backward`` with the saved statistics, as autograd would
call it. The equivalence tests against ``masked`` cover it like any other layer.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn

from ..features import SparseRows
from .common import Elementwise, FeatureBatchNorm

__all__ = ["FusedBatchNormReLU", "saved_as_recipe", "fuse_bn_relu_pairs", "register_bn_relu_pairs", "bn_relu_pairs_of"]

#: ``(bn child, activation child, children called between them that must be identities)``
BnReluPair = tuple[str, str, tuple[str, ...]]
_BN_RELU_PAIRS: dict[type, tuple[BnReluPair, ...]] = {}


def register_bn_relu_pairs(block_type: type, *pairs: BnReluPair) -> None:
    """Declare, for blocks of exactly ``block_type``, the BatchNorm -> ReLU child pairs its forward
    calls back to back (in forward order), which a backend may fuse (see :func:`fuse_bn_relu_pairs`).

    Only pairs whose ReLU output feeds a convolution (or a max-pool) save memory: the consumer then
    keeps a recompute recipe instead of the rows.
    """
    _BN_RELU_PAIRS[block_type] = tuple(pairs)


def bn_relu_pairs_of(block: nn.Module) -> tuple[BnReluPair, ...]:
    return _BN_RELU_PAIRS.get(type(block), ())


class _ReluOfBatchNorm:
    """Remakes ``relu(BN(x))`` with batch statistics, bit for bit as the forward made it.

    The conv after the fused layer calls it (through its saved-tensor recipe) just before the fused
    layer's own backward runs, which needs only where the output is positive: the remade output is
    handed over once instead of being computed twice.
    """

    def __init__(self, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float):
        self.x, self.weight, self.bias, self.eps = x, weight, bias, eps
        self._handoff: Optional[torch.Tensor] = None

    def __call__(self) -> torch.Tensor:
        with torch.no_grad():
            out = torch.native_batch_norm(self.x, self.weight, self.bias, None, None, True, 0.0, self.eps)[0]
        self._handoff = out.relu_()
        return self._handoff

    def take(self) -> torch.Tensor:
        """The output remade last (once), or a fresh one."""
        out, self._handoff = self._handoff, None
        return out if out is not None else self()


class _BatchNormReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float,
                remake: _ReluOfBatchNorm):
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.eps, ctx.remake = eps, remake
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        return out.relu_()

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        output = ctx.remake.take()          # a second backward (retain_graph) remakes it again
        grad_pre = torch.ops.aten.threshold_backward(grad_y, output, 0)      # ReLU's own backward
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_pre.contiguous(), x, weight, None, None, mean, invstd, True, ctx.eps,
            [need_x, need_w and weight is not None, need_b and bias is not None])
        return grad_x, grad_w, grad_b, None, None, None, None, None


class FusedBatchNormReLU(FeatureBatchNorm):
    """``FeatureBatchNorm`` followed by ``ReLU`` (BatchNorm2d's parameter names and statistics).

    Fused only where it saves memory and the maths is plain: training-mode batch statistics on
    sparse rows that need a gradient, outside autocast. Everywhere else it is exactly BN then ReLU.
    """

    def _exponential_average_factor(self) -> float:
        """``nn.BatchNorm``'s momentum rule (``momentum=None``: cumulative average)."""
        if not (self.training and self.track_running_stats):
            return 0.0
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

    def _fusable(self, x) -> bool:
        uses_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        return (isinstance(x, SparseRows) and uses_batch_stats and torch.is_grad_enabled() and x.data.requires_grad
                and not torch.is_autocast_enabled(x.data.device.type))

    def forward(self, x):
        if not self._fusable(x):
            return super().forward(x).elementwise(torch.relu)
        rows = self.rows_with_statistics(x).contiguous()
        momentum = self._exponential_average_factor()
        running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        remake = _ReluOfBatchNorm(rows, self.weight, self.bias, self.eps)
        y = _BatchNormReLUFunction.apply(rows, self.weight, self.bias, *running, momentum, self.eps, remake)
        return SparseRows(y, x.mask, x.stride, recompute=remake)

    def describe_execution(self, device, dtype) -> str:
        return f"{'fused':<10} BatchNorm+ReLU (keeps the BN input only; the ReLU output is recomputed in backward)"


@dataclass(frozen=True)
class _Recipe:
    """A saved view of rows that can be recomputed: how to remake the rows, and which view it was."""

    recompute: Callable[[], torch.Tensor]
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


@contextlib.contextmanager
def saved_as_recipe(rows: SparseRows) -> Iterator[None]:
    """Within the block, autograd saves ``rows.data`` (or any view of it) as its recompute recipe.

    Used around one conv call, so only that conv's saved input is affected; any other tensor it saves
    is kept as usual. Rows without a recipe leave autograd alone.
    """
    if rows.recompute is None:
        yield
        return
    # autograd keeps both hooks with every tensor they saved: they must not reference ``rows``
    # (that would keep the very tensor this saves)
    recompute, dtype, storage = rows.recompute, rows.data.dtype, rows.data.untyped_storage().data_ptr()

    def pack(t: torch.Tensor):
        if t.dtype == dtype and t.untyped_storage().data_ptr() == storage:
            return _Recipe(recompute, t.size(), t.stride(), t.storage_offset())
        return t

    def unpack(saved):
        if isinstance(saved, _Recipe):
            return saved.recompute().as_strided(saved.size, saved.stride, saved.offset)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def _is_plain_relu(module: nn.Module) -> bool:
    return isinstance(module, Elementwise) and type(module.fn) is nn.ReLU


def fuse_bn_relu_pairs(backend, block: nn.Module, pairs: tuple[BnReluPair, ...]) -> None:
    """Fuse ``(bn, act, between)`` child pairs of a block ``backend`` has converted, in place.

    ``between`` names the children the block's forward calls between the two; the pair is fused only
    when they are all identities (e.g. timm's ``drop_block`` when DropBlock is off), when the BN is
    a plain (not synchronised) :class:`FeatureBatchNorm` and the activation a plain ReLU. The
    activation's slot becomes ``nn.Identity`` (it has no state, so state dicts do not change).
    """
    for bn_name, act_name, between in pairs:
        bn, act = getattr(block, bn_name, None), getattr(block, act_name, None)
        if (type(bn) is FeatureBatchNorm and _is_plain_relu(act)
                and all(isinstance(getattr(block, name, None), nn.Identity) for name in between)):
            setattr(block, bn_name, FusedBatchNormReLU.from_dense(backend, bn))
            setattr(block, act_name, nn.Identity())
