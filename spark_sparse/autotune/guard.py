"""The whole-encoder guard: the tuned plan must beat SparK's masked convolution, or masked runs.

Per-layer timings miss what lies between the convs (norms, activations, residual adds, the rows'
gathers and scatters, tables shared by several layers) and what a small input does to all of it.
So after choosing per layer, the guard times the encoder's forward+backward, on the run's batch,
image size, mask ratio, dtype and memory format, three ways: the tuned plan, the ``sparse``
backend's static rule (when it differs) and the ``masked`` backend, and the run uses the fastest
by a margin (:func:`choose_encoder`).

Three things make the guard sturdy on a noisy machine. On a shared 2-core VM the same plan timed
twice, interleaved, gives medians of 3 rounds several percent apart, more on small inputs
(``benchmarks/guard_noise.py`` measures it: an A/A control). So the guard takes its own, larger
number of rounds; the order of the variants rotates every round, so none is always timed first
(after another model) or last; and a variant replaces a simpler one only when it is faster by
more than ``margin``: ``masked`` (SparK's own computation) stands unless beaten, the static rule
stands unless the tuned plan beats it. A real gain smaller than the margin is given up; a loss
hidden in the noise is not taken. What none of this survives is another process loading the machine
during the guard (a user trial saw masked timed at 40 times its later time): the run is warned
when the rounds spread that widely (:func:`unsteady_timings`).

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
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn as nn

from ..mask import ActiveMask
from .timing import Measurement, Timer

__all__ = ["EncoderVariant", "PREFERENCE", "UNSTEADY_SPREAD", "choose_encoder", "middle_half", "time_encoder_rounds",
           "time_encoders", "unsteady_timings", "left_as_it_was"]

#: simplest first: a later variant must beat the current choice by the margin to replace it
PREFERENCE = ("masked", "static", "tuned")
#: timings whose middle half of rounds spans more than this (a fraction) are said to be unsteady: far more than
#: a quiet machine's rounds spread (``benchmarks/guard_noise.py`` shows them), as another process's load does
UNSTEADY_SPREAD = 0.5


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
                  amp_dtype: Optional[torch.dtype], timer: Timer, warmup: int, repeats: int,
                  on_failure: Optional[Callable[[str, Exception], None]] = None) -> dict[str, float]:
    """Median ms of each variant's encoder forward+backward (see :func:`time_encoder_rounds`)."""
    rounds = time_encoder_rounds(variants, images, active, amp_dtype, timer, warmup, repeats, on_failure)
    return {name: statistics.median(values) for name, values in rounds.items()}


def time_encoder_rounds(variants: list[EncoderVariant], images: torch.Tensor, active: torch.Tensor,
                        amp_dtype: Optional[torch.dtype], timer: Timer, warmup: int, repeats: int,
                        on_failure: Optional[Callable[[str, Exception], None]] = None) -> dict[str, list[float]]:
    """The ms of each variant's encoder forward+backward in every timed round, interleaved so drift cancels.

    Round ``r`` starts at variant ``r mod n`` (A B C, B C A, C A B, ...): no variant is always
    timed first or last, so an order effect (caches, the allocator, the other model's memory)
    lands on each in turn.

    The loss is a scalar of the active rows of every level (what densify reads). ``images``:
    ``(B, 3, H, W)``; ``active``: ``(B, 1, h, w)`` bool; a fresh mask per call builds its index
    tables inside the timed region, as every training step does.

    With ``on_failure``, a variant other than ``masked`` that raises (e.g. out of memory at the run's
    batch) is told to it and left out of the result, so that the others still compete; without it, or
    for ``masked`` (what the run falls back to), the error propagates.
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
            start = rep % len(variants)
            for variant in variants[start:] + variants[:start]:
                if variant.name not in samples:                   # failed in an earlier round
                    continue
                variant.select()
                variant.spark.zero_grad(set_to_none=True)
                mask = ActiveMask(active, variant.spark.downsample_ratio)

                def run(spark=variant.spark, mask=mask) -> None:
                    with autocast():
                        features = spark.encode(images, mask)
                        loss = sum(f.active_rows().float().square().mean() for f in features)
                    loss.backward()

                try:
                    if rep < warmup:
                        run()
                    else:
                        samples[variant.name].append(timer(run, Measurement("encoder", "", variant.name)))
                except Exception as err:   # any kernel error; masked's, or without a handler, is the run's
                    if on_failure is None or variant.name == "masked":
                        raise
                    del samples[variant.name]
                    variant.spark.zero_grad(set_to_none=True)
                    if images.device.type == "cuda":
                        torch.cuda.empty_cache()                  # an out-of-memory variant's blocks
                    on_failure(variant.name, err)
    return samples


def unsteady_timings(rounds: dict[str, list[float]], spread: float) -> dict[str, tuple[float, float]]:
    """The variants whose middle half of rounds spans more than ``spread`` (a fraction of its fastest end),
    with that span (lower, upper quartile in ms).

    Another process on the machine adds time to some rounds and not others; a guard that decides on
    such timings may pick the slower variant, and the run should say so. The quartiles, not the
    extremes: one slow round (a page fault, a timer tick) is normal and the median already ignores it.
    With fewer than 5 rounds one slow round moves a quartile, so nothing is judged.
    """
    spans = {name: middle_half(values) for name, values in rounds.items() if len(values) >= 5}
    return {name: (lower, upper) for name, (lower, upper) in spans.items() if upper > lower * (1.0 + spread)}


def middle_half(values: list[float]) -> tuple[float, float]:
    """The lower and upper quartile of ``values`` (at least 2)."""
    lower, _, upper = statistics.quantiles(values, n=4, method="inclusive")
    return lower, upper


def choose_encoder(ms: dict[str, float], margin: float, allowed: Optional[Iterable[str]] = None) -> str:
    """The variant to run: in :data:`PREFERENCE` order, each replaces the choice so far only when faster
    by more than ``margin`` (a fraction); ``masked`` is the starting choice. Exact ties keep masked.
    Only ``allowed`` variants compete (default: every timed one; e.g. those within the memory limit).
    """
    allowed = set(ms if allowed is None else allowed)
    order = [name for name in PREFERENCE if name in ms and name in allowed]
    if not order:
        raise ValueError(f"no allowed variant among the timed ones ({sorted(ms)})")
    choice = order[0]
    for name in order[1:]:
        if ms[name] < ms[choice] * (1.0 - margin):
            choice = name
    return choice
