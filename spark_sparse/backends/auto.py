"""``auto``: the ``sparse`` backend with each convolution pinned to the kernel measured fastest here.

A fixed priority list cannot be right everywhere: which kernel wins a layer depends on the device,
the dtype, the layer's shape and how many rows are active (on a small input the scatter -> dense
conv -> gather path can beat every gather-based kernel; on a large one the gather-GEMM wins). So,
like ``cudnn.benchmark``, :func:`spark_sparse.autotune.autotune` times forward+backward of every
kernel that declares it can run a layer on that layer's real shapes and pins the fastest
(:meth:`SparseConv2d.pin_kernel`). Given ``kernels=``, it chooses only among the kernels the
``sparse`` rule tries for the layer with that list (the list, and ``dense`` first for depthwise convs
and stems), so a registered kernel the user left out is never timed or pinned. Until it has run (or
for layers it did not measure) a layer follows the ``sparse`` backend's static rule, so an untuned
``auto`` computes exactly what ``sparse`` does. Everything else (fused BatchNorm+ReLU, Linear on
rows, argmax max-pool) is the ``sparse`` backend's.

The backend keeps what tuning decided for each layer (:class:`LayerDecision`, with every
candidate's measured ms) so that :meth:`plan` prints it next to the kernel that runs.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn

from .registry import register_backend
from .rows import SparseConv2d
from .sparse import SparseBackend

__all__ = ["AutoBackend", "LayerDecision", "sparse_convs"]


@dataclass
class LayerDecision:
    """How one layer's kernel was chosen.

    ``status`` says where the choice comes from: ``measured`` (timed now), ``cached`` (timed on an
    earlier run with the same key), ``checkpoint`` (the plan of the run being resumed), or why the
    static rule applies (``not measured: ...``, ``budget exhausted``, ``autotune off``).
    ``ms``: candidate kernel -> median forward+backward milliseconds (empty when not measured).
    """

    layer: str
    kernel: str
    status: str
    ms: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        if not self.ms:
            return self.status
        ran = sorted(((name, ms) for name, ms in self.ms.items() if math.isfinite(ms)), key=lambda item: item[1])
        failed = sorted(name for name, ms in self.ms.items() if not math.isfinite(ms))     # cached as inf
        parts = [f"{', '.join(f'{name} {ms:.3g}' for name, ms in ran)} ms"] if ran else []
        if failed:
            parts.append(f"failed: {', '.join(failed)}")
        return f"{self.status}: {'; '.join(parts)}"


def sparse_convs(encoder: nn.Module) -> list[tuple[str, SparseConv2d]]:
    """``(qualified name, module)`` of every converted convolution, in forward-definition order."""
    return [(name, module) for name, module in encoder.named_modules() if isinstance(module, SparseConv2d)]


@register_backend
class AutoBackend(SparseBackend):
    name = "auto"
    description = ("each conv on the kernel measured fastest here (autotune, cached), masked when that is not "
                   "faster (the fast recipe's default)")

    def __init__(self, strict: bool = False, kernels: Optional[Sequence[str]] = None):
        super().__init__(strict=strict, kernels=kernels)
        #: layer name -> how its kernel was chosen (filled by :func:`spark_sparse.autotune.autotune`)
        self.decisions: dict[str, LayerDecision] = {}
        #: whether :meth:`pin` ran (autotune pins, even ``--autotune off``, and so does a saved plan): an untuned
        #: ``auto`` is ``sparse`` under another name, which a Python user who skipped autotune() would not know
        self.tuned = False
        self._said_untuned = False

    @contextmanager
    def probing(self) -> Iterator[None]:
        """While autotune runs the model before pinning it: no "has not been tuned" warning then."""
        said = self._said_untuned
        self._said_untuned = True
        try:
            yield
        finally:
            self._said_untuned = said

    def features_from_image(self, images: torch.Tensor, mask):
        if not self.tuned and not self._said_untuned:
            self._said_untuned = True
            warnings.warn("backend 'auto' has not been tuned, so every conv runs on the 'sparse' backend's static "
                          "rule: call spark_sparse.autotune.autotune(spark, batch_size, device) once before "
                          "training (spark-pretrain does), or build the model on backend='sparse' to say so",
                          UserWarning, stacklevel=3)
        return super().features_from_image(images, mask)

    def static_kernel(self, conv: SparseConv2d, device_type: str, dtype: torch.dtype) -> str:
        """The kernel the ``sparse`` backend's static rule picks for ``conv`` (what runs when untuned)."""
        pinned = conv.pinned_kernel(device_type, dtype)
        conv.pin_kernel(device_type, dtype, None)
        try:
            return conv.kernel_for(torch.device(device_type), dtype).NAME
        finally:
            if pinned is not None:
                conv.pin_kernel(device_type, dtype, pinned)

    def pin(self, encoder: nn.Module, device_type: str, dtype: torch.dtype,
            decisions: dict[str, LayerDecision]) -> None:
        """Pin every layer to its decided kernel; layers without a decision return to the static rule."""
        for name, conv in sparse_convs(encoder):
            decision = decisions.get(name)
            conv.pin_kernel(device_type, dtype, decision.kernel if decision is not None else None)
            conv.kernel_for(torch.device(device_type), dtype)     # resolved now, not inside a timed step
        self.decisions = dict(decisions)
        self.tuned = True

    def plan(self, encoder: nn.Module, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> list[tuple[str, str]]:
        rows = super().plan(encoder, device, dtype)
        return [(name, f"{how}  [{self.decisions[name].describe()}]" if name in self.decisions else how)
                for name, how in rows]
