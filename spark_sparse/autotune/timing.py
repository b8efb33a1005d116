"""How autotuning times things: one call at a time, medians of repeats after warm-up.

The timer is a parameter (``Timer``) so that tests can inject a deterministic one: every call says
*what* it times (:class:`Measurement`), and a fake timer answers from a table instead of a clock.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

__all__ = ["Measurement", "Timer", "WallClockTimer", "median_ms"]


@dataclass(frozen=True)
class Measurement:
    """What one timed call runs.

    ``kind`` is ``"layer"`` (one conv layer's forward+backward on ``candidate`` kernel) or
    ``"encoder"`` (the whole encoder's forward+backward; ``candidate`` is ``"tuned"``,
    ``"static"`` or ``"masked"``). ``name`` is the layer's qualified name (``""`` for the encoder).
    """

    kind: str
    name: str
    candidate: str


class Timer(Protocol):
    def __call__(self, fn: Callable[[], None], what: Measurement) -> float:
        """Run ``fn`` once and return how long it took, in milliseconds."""


class WallClockTimer:
    """Wall-clock time of one call; on CUDA the device is synchronised before and after.

    Wall-clock (not CUDA events) on purpose: the host work of a kernel (index tables, launches)
    is part of what a training step pays.
    """

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn: Callable[[], None], what: Measurement) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000.0


def median_ms(timer: Timer, fn: Callable[[], None], what: Measurement, warmup: int, repeats: int,
              prepare: Optional[Callable[[], None]] = None, give_up_above: Optional[float] = None) -> float:
    """Median of ``repeats`` timed calls of ``fn`` after ``warmup`` untimed ones.

    ``prepare`` runs (untimed) before every call, e.g. to make a fresh mask. When the first timed
    call already takes more than ``give_up_above`` ms (a candidate that cannot win), it is returned
    without further repeats: tuning time goes to the candidates that can.
    """
    for _ in range(warmup):
        if prepare is not None:
            prepare()
        fn()
    samples = []
    for _ in range(max(1, repeats)):
        if prepare is not None:
            prepare()
        samples.append(timer(fn, what))
        if give_up_above is not None and samples[0] > give_up_above:
            break
    return statistics.median(samples)
