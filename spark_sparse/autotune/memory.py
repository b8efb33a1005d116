"""What a plan holds for backward, and a lighter plan when the fastest one would raise the step's peak.

Kernels differ in what the encoder's forward leaves for backward: ``gemm`` keeps its input rows
and index tables, the ``gather`` kernel every tap of its input, table-based library kernels their
rulebooks, ``dense`` a dense copy of the layer's input. The fastest kernel per layer can therefore
hold more than SparK's ``masked`` encoder does, and a batch that fits under SparK's recipe might no
longer fit under ours. So the tuned plan is held to a limit on the training step's estimated peak:
at most ``limit`` times ``masked``'s.

What is measured: the bytes of every distinct storage autograd saves during one forward of the
whole SparK loss (``torch.autograd.graph.saved_tensors_hooks``), leaving out the parameters and the
input images; exact and deterministic on every device, with no clock. The estimate of a step's
peak (:meth:`MemoryCheck.step_mb`) adds what every variant holds alike: the parameters and the two
moments of SparK's optimizers (AdamW, LAMB), plus the larger of the forward's saved tensors and the
gradients (backward frees the one as it makes the other). With small inputs the gradients dominate
and no plan needs to move; at SparK's batch sizes the saved tensors do. Transient buffers of
backward are not counted.

When the tuned plan is over the limit, :func:`lighter_plan` moves layers to kernels that hold
less, the smallest slowdown per byte freed first (per-layer bytes from ``layer_held_bytes``, an
estimate: a table shared by the layers of one geometry is charged to each); the model is then
measured again, and the moves go on until it fits or no move is left.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

from ..mask import ActiveMask
from .guard import left_as_it_was

__all__ = ["MemoryCheck", "held_bytes", "lighter_plan", "parameters_bytes", "step_held_bytes"]

MB = 2.0 ** 20


#: parameters and the two moments of SparK's optimizers (AdamW, LAMB), per parameter byte
STATE_PER_PARAMETER_BYTE = 3


@dataclass
class MemoryCheck:
    """What each variant's step holds, its estimated peak, and the limit.

    ``limit``: the most a plan's step may peak at, as a multiple of ``masked``'s (``None``: no limit).
    ``held_mb``: variant -> MB the step's forward holds for backward (``masked``; ``fastest``, the
    per-layer fastest plan, when it was over the limit; ``tuned``, the plan that runs; ``static``,
    the static rule, when it differs). ``params_mb``: the SparK's parameters. ``moved``: layer ->
    kernel it was moved to for memory. ``status``: ``measured`` or why not.
    """

    limit: Optional[float]
    held_mb: dict[str, float] = field(default_factory=dict)
    params_mb: float = 0.0
    moved: dict[str, str] = field(default_factory=dict)
    status: str = "measured"

    def step_mb(self, variant: str) -> float:
        """Estimated peak of a training step: parameters and optimizer moments, then the larger of the
        forward's saved tensors and the gradients."""
        return STATE_PER_PARAMETER_BYTE * self.params_mb + max(self.held_mb[variant], self.params_mb)

    def held_allowed_mb(self) -> float:
        """The most a plan's forward may hold and stay within the limit (can be below the gradients: then
        no plan fits)."""
        return self.limit * self.step_mb("masked") - STATE_PER_PARAMETER_BYTE * self.params_mb

    def fits(self, variant: str) -> bool:
        """Whether ``variant`` is within the limit (true when nothing was measured or there is no limit)."""
        if self.limit is None or "masked" not in self.held_mb or variant not in self.held_mb:
            return True
        return self.step_mb(variant) <= self.limit * self.step_mb("masked") * (1 + 1e-9)

    def describe(self) -> str:
        if not self.held_mb:
            return f"memory {self.status}"
        held = ", ".join(f"{name} {mb:.4g}" for name, mb in self.held_mb.items())
        peak = ", ".join(f"{name} {self.step_mb(name):.4g}" for name in self.held_mb)
        limit = "no limit" if self.limit is None else f"limit {self.limit:g} x masked"
        moved = f"; {len(self.moved)} layers moved to kernels holding less" if self.moved else ""
        return (f"step memory ({limit}): forward holds {held} MB, estimated peak {peak} MB "
                f"(parameters {self.params_mb:.4g} MB){moved}")


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def held_bytes(run: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves while ``run()`` executes, without ``exclude``'s.

    What ``run`` returns is dropped before this returns, so what it saved is freed again. The pack hook
    keeps a detached view: it holds the storage alive until then (so no two saved storages can share
    an address and be counted once) without the tensor's ``grad_fn``. Returning the tensor itself would
    tie a saved output (ReLU's, exp's) to its own graph node in a cycle through C++ that Python's
    garbage collector cannot see: never run backward, the whole graph would leak. The returned graph
    is not meant for backward.
    """
    excluded = {_storage_key(t) for t in exclude if t is not None}
    saved: dict[tuple[int, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.layout == torch.strided and tensor.device.type != "meta":
            key = _storage_key(tensor)
            if key not in excluded:
                saved[key] = key[1]
        return tensor.detach()

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    del result
    return sum(saved.values())


def step_held_bytes(spark: nn.Module, images: torch.Tensor, active: torch.Tensor,
                    amp_dtype: Optional[torch.dtype]) -> int:
    """What one forward of ``spark``'s loss (training mode, the run's autocast) holds for backward.

    ``spark`` is left as it was (BatchNorm statistics, modes, gradients).
    """
    autocast = (torch.autocast(images.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext())
    with left_as_it_was(spark):
        spark.train()
        with autocast:
            return held_bytes(lambda: spark(images, ActiveMask(active, spark.downsample_ratio)),
                              exclude=[images, *spark.parameters(), *spark.buffers()])


def parameters_bytes(spark: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in spark.parameters())


def lighter_plan(kernels: dict[str, str], ms: dict[str, dict[str, float]], held: dict[str, dict[str, int]],
                 to_free: int) -> dict[str, str]:
    """Layers moved from ``kernels`` to kernels that hold less, until ``to_free`` bytes are freed.

    ``ms[layer][kernel]``: measured milliseconds; ``held[layer][kernel]``: bytes held (estimates).
    Each move is the one with the smallest slowdown per byte freed among every layer's options
    (a move that is also faster goes first); a layer can move again from where it went. Returns the
    new kernel of every layer that moved (fewer bytes than ``to_free`` when the options run out).
    """
    current = dict(kernels)
    freed = 0
    while freed < to_free:
        best: Optional[tuple[float, str, str, int]] = None
        for layer, kernel in current.items():
            options = held.get(layer, {})
            if kernel not in options or kernel not in ms.get(layer, {}):
                continue
            for other, other_held in options.items():
                gain = options[kernel] - other_held
                if other == kernel or gain <= 0 or other not in ms[layer]:
                    continue
                cost = (ms[layer][other] - ms[layer][kernel]) / gain
                if best is None or cost < best[0]:
                    best = (cost, layer, other, gain)
        if best is None:
            break
        _, layer, other, gain = best
        current[layer] = other
        freed += gain
    return {layer: kernel for layer, kernel in current.items() if kernel != kernels[layer]}
