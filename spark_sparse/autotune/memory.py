"""What a plan's training step peaks at, and a lighter plan when the fastest one would raise that peak.

Kernels differ in what the encoder's forward leaves for backward and in what their backward
allocates on the way: ``gemm`` keeps its input rows and index tables, the ``gather`` kernel every
tap of its input, table-based library kernels their rulebooks, ``dense`` a dense copy of the
layer's input. The fastest kernel per layer can therefore peak higher than SparK's ``masked``
encoder does, and a batch that fits under SparK's recipe might no longer fit under ours. So the
tuned plan is held to a limit on the training step's peak: at most ``limit`` times ``masked``'s.

What is measured (:func:`step_peak_bytes`): one forward and backward of the whole SparK loss, and
the most memory it had allocated at once above what was there before (parameters, input images):
saved activations, backward's transient buffers and the gradients alike. On CUDA that is the
caching allocator's own counter (``max_memory_allocated``), which sees every block, library
workspaces included. Elsewhere it is :class:`LiveTensorPeak`: the bytes of the storages that torch
operators created and that are still alive, taken after every operator; buffers a library
allocates outside torch's operators, and an operator's internal scratch space, are not seen. Both
are deterministic, with no clock. The estimate of a step's peak (:meth:`MemoryCheck.step_mb`) adds
what every variant holds alike: the parameters and the two moments of SparK's optimizers (AdamW,
LAMB); the optimizer's own transient buffers come after backward has freed the activations.

Checking the whole step, not only what forward saves, matters: on ``hrnet_w18_small`` a plan whose
forward saved less than ``masked``'s peaked higher than it, by its backward's buffers.

When the tuned plan is over the limit, :func:`lighter_plan` moves layers to kernels that hold
less, the smallest slowdown per byte freed first (per-layer bytes from ``layer_held_bytes``, an
estimate: what the layer's forward saves, a table shared by the layers of one geometry charged to
each); the step is then measured again, and the moves go on until it fits or no move is left.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..mask import ActiveMask
from .guard import left_as_it_was

__all__ = ["MEASURE", "LiveTensorPeak", "MemoryCheck", "held_bytes", "lighter_plan", "parameters_bytes", "peak_bytes",
           "step_peak_bytes"]

MB = 2.0 ** 20


#: what :class:`MemoryCheck`'s figures measure; part of the guard's cache key, so that a guard result
#: chosen under another measure of memory is not reused
MEASURE = "forward+backward peak"

#: parameters and the two moments of SparK's optimizers (AdamW, LAMB), per parameter byte
STATE_PER_PARAMETER_BYTE = 3


@dataclass
class MemoryCheck:
    """What each variant's step peaks at, and the limit.

    ``limit``: the most a plan's step may peak at, as a multiple of ``masked``'s (``None``: no limit).
    ``peak_mb``: variant -> MB one forward and backward of the step allocates at most, above what was
    there before (``masked``; ``fastest``, the per-layer fastest plan, when it was over the limit;
    ``tuned``, the plan that runs; ``static``, the static rule, when it differs). ``params_mb``: the
    SparK's parameters. ``moved``: layer -> kernel it was moved to for memory. ``status``:
    ``measured`` or why not.
    """

    limit: Optional[float]
    peak_mb: dict[str, float] = field(default_factory=dict)
    params_mb: float = 0.0
    moved: dict[str, str] = field(default_factory=dict)
    status: str = "measured"

    def step_mb(self, variant: str) -> float:
        """Estimated peak of a training step: parameters and optimizer moments, plus the measured peak of
        its forward and backward (gradients included)."""
        return STATE_PER_PARAMETER_BYTE * self.params_mb + self.peak_mb[variant]

    def peak_allowed_mb(self) -> float:
        """The most a plan's forward and backward may allocate and stay within the limit."""
        return self.limit * self.step_mb("masked") - STATE_PER_PARAMETER_BYTE * self.params_mb

    def fits(self, variant: str) -> bool:
        """Whether ``variant`` is within the limit (true when nothing was measured or there is no limit)."""
        if self.limit is None or "masked" not in self.peak_mb or variant not in self.peak_mb:
            return True
        return self.step_mb(variant) <= self.limit * self.step_mb("masked") * (1 + 1e-9)

    def describe(self) -> str:
        if not self.peak_mb:
            return f"memory {self.status}"
        measured = ", ".join(f"{name} {mb:.4g}" for name, mb in self.peak_mb.items())
        peak = ", ".join(f"{name} {self.step_mb(name):.4g}" for name in self.peak_mb)
        limit = "no limit" if self.limit is None else f"limit {self.limit:g} x masked"
        moved = f"; {len(self.moved)} layers moved to kernels holding less" if self.moved else ""
        return (f"step memory ({limit}): forward+backward peaks at {measured} MB, with parameters and optimizer "
                f"state {peak} MB (parameters {self.params_mb:.4g} MB){moved}")


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


class LiveTensorPeak(TorchDispatchMode):
    """The most bytes of storages created by torch operators under this mode and alive at once.

    Taken after every operator, with its inputs and outputs alive; the autograd engine runs backward's
    operators under the same mode, so backward's transient buffers and the gradients are counted too.
    Storages that existed before (parameters, inputs) are not counted; a view shares its base's storage.
    A storage is forgotten once freed (a weak reference), so one reused address is never counted twice.
    """

    def __init__(self):
        super().__init__()
        self._live: dict[tuple[int, int], StorageWeakRef] = {}
        self.live_bytes = 0
        self.peak_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [key for key, ref in self._live.items() if ref.expired()]:
            del self._live[key]
            self.live_bytes -= key[1]
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided and tensor.device.type != "meta":
                key = _storage_key(tensor)
                if key[1] > 0 and key not in self._live and not self._existed(key, args, kwargs):
                    self._live[key] = StorageWeakRef(tensor.untyped_storage())
                    self.live_bytes += key[1]
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out

    def _existed(self, key: tuple[int, int], args, kwargs) -> bool:
        """Whether an output is (a view of) one of the operator's inputs, i.e. no new memory."""
        return any(isinstance(t, torch.Tensor) and t.layout == torch.strided and _storage_key(t) == key
                   for t in tree_leaves((args, kwargs)))


def peak_bytes(run: Callable[[], object], device: torch.device) -> int:
    """The most memory ``run()`` had allocated at once, above what was allocated before it.

    CUDA: the caching allocator's peak (every block, library workspaces included; the device's peak
    statistics are reset). Other devices: :class:`LiveTensorPeak`. What ``run`` returns is dropped.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with LiveTensorPeak() as tracker:
        run()
    return tracker.peak_bytes


def step_peak_bytes(spark: nn.Module, images: torch.Tensor, active: torch.Tensor,
                    amp_dtype: Optional[torch.dtype]) -> int:
    """The peak of one forward and backward of ``spark``'s loss (training mode, the run's autocast),
    gradients allocated anew as after ``zero_grad(set_to_none=True)``.

    ``spark`` is left as it was (BatchNorm statistics, modes; gradients cleared).
    """
    autocast = (torch.autocast(images.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext())

    def forward_backward() -> None:
        with autocast:
            loss = spark(images, ActiveMask(active, spark.downsample_ratio))
        loss.backward()

    with left_as_it_was(spark):
        spark.train()
        spark.zero_grad(set_to_none=True)
        return peak_bytes(forward_backward, images.device)


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
