"""The whole-encoder guard: the tuned plan must beat SparK's masked convolution, or masked runs.

Per-layer timings miss what lies between the convs (norms, activations, residual adds, the rows'
gathers and scatters, tables shared by several layers) and what a small input does to all of it.
So after choosing per layer, the guard times the encoder's forward+backward, on the run's batch,
image size, mask ratio, dtype and memory format, three ways: the tuned plan, the ``sparse``
backend's static rule (when it differs) and the ``masked`` backend, and the run uses the fastest.

``masked`` is another representation (dense maps, not rows), so it cannot be a per-layer choice:
the guard times a *twin* SparK built on ``masked``. SparK's parameter and buffer names do not
depend on the backend, so the twin loads the tuned model's state dict as it is, and when masked
wins the twin (holding the same initial weights) is the model the run trains.

Timing runs in training mode, so BatchNorm running statistics move: they are saved before and
restored after, and parameter gradients are cleared, so a timed model is left as it was given.
"""
from __future__ import annotations

import statistics
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn

from ..mask import ActiveMask
from .timing import Measurement, Timer

__all__ = ["EncoderVariant", "time_encoders", "left_as_it_was"]


@contextmanager
def left_as_it_was(model: nn.Module) -> Iterator[nn.Module]:
    """Restore ``model``'s buffers (BatchNorm statistics) and train/eval modes; clear its gradients."""
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    modes = {module: module.training for module in model.modules()}
    try:
        yield model
    finally:
        for module, mode in modes.items():
            module.training = mode
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name in saved:
                    buf.copy_(saved[name])
        model.zero_grad(set_to_none=True)


@dataclass
class EncoderVariant:
    """One way to run the encoder: ``spark`` after ``select()`` (e.g. pinning a plan's kernels)."""

    name: str
    spark: nn.Module
    select: Callable[[], None] = lambda: None


def time_encoders(variants: list[EncoderVariant], images: torch.Tensor, active: torch.Tensor,
                  amp_dtype: Optional[torch.dtype], timer: Timer, warmup: int, repeats: int) -> dict[str, float]:
    """Median ms of each variant's encoder forward+backward, interleaved (A B C A B C ...) so drift cancels.

    The loss is a scalar of the active rows of every level (what densify reads). ``images``:
    ``(B, 3, H, W)``; ``active``: ``(B, 1, h, w)`` bool; a fresh mask per call builds its index
    tables inside the timed region, as every training step does.
    """
    def autocast():
        return torch.autocast(images.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()

    samples: dict[str, list[float]] = {variant.name: [] for variant in variants}
    models = list({id(variant.spark): variant.spark for variant in variants}.values())
    with ExitStack() as stack, torch.enable_grad():
        for model in models:
            stack.enter_context(left_as_it_was(model))
            model.train()
        for rep in range(warmup + max(1, repeats)):
            for variant in variants:
                variant.select()
                variant.spark.zero_grad(set_to_none=True)
                mask = ActiveMask(active, variant.spark.downsample_ratio)

                def run(spark=variant.spark, mask=mask) -> None:
                    with autocast():
                        features = spark.encode(images, mask)
                        loss = sum(f.active_rows().float().square().mean() for f in features)
                    loss.backward()

                if rep < warmup:
                    run()
                else:
                    samples[variant.name].append(timer(run, Measurement("encoder", "", variant.name)))
    return {name: statistics.median(values) for name, values in samples.items()}
