"""Measured per-layer dispatch for the ``auto`` backend: tune, cache, guard, and the plan state.

:func:`autotune` is called once before timing or training, on the run's batch, image size, mask
ratio, device and dtype:

1. every converted conv's shapes are recorded (:func:`.layers.discover_layers`);
2. per layer, every registered kernel that declares it can run the layer (on the CPU: and that its
   results are bit-reproducible, see ``REPRODUCIBLE_DEVICES``) is timed (forward +
   backward, median of ``repeats`` after ``warmup``), largest layers first, identical layers once;
   results go to the cache file (:mod:`.cache`) and are reused by later runs;
3. each layer is pinned to its fastest kernel;
4. memory: when that plan's training step would peak above ``memory_limit`` x ``masked``'s (one
   forward and backward of each measured, :mod:`.memory`), layers move to kernels that hold less
   until it fits (no clock: in every mode but ``off``);
5. the whole-encoder guard (:mod:`.guard`) times the tuned plan against the static rule and
   against ``masked`` (``guard_repeats`` rounds, order rotated) and the run uses the fastest of those
   within the memory limit, where a variant must beat a simpler one by ``guard_margin``
   (:func:`.guard.choose_encoder`); when that is ``masked`` the result carries a SparK built on
   ``masked`` holding the same weights.

Modes: ``on`` (use the cache for layers, measure what is missing; the guard is timed on every run),
``cached`` (the cache only: layers not in it keep the static rule and say so; the guard's last cached
result is applied when there is one), ``off`` (the static rule).
Tuning time is bounded by ``budget_s`` for the layer measurements (layers left when it runs out keep
the static rule and say so); the guard always runs in mode ``on``, because it is what guarantees
that the result is never slower than ``masked``.

The outcome is serialisable (:meth:`AutotuneResult.plan_state`): layer -> kernel plus the guard's
decision. Stored in a checkpoint and given back to :func:`autotune` (or :func:`load_plan_state`),
it re-applies the same kernels without measuring, so a resumed run computes exactly what the
interrupted one did. In a distributed run rank 0 measures and every rank applies rank 0's plan
(the guard, whose models may hold SyncBatchNorm layers, is timed on every rank in step).
"""
from __future__ import annotations

import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from ..backends.auto import AutoBackend, LayerDecision, sparse_convs
from ..errors import ConfigError
from ..kernels import NoKernelError
from ..mask import ActiveMask
from .cache import CACHE_FILE, TuneCache, canonical, environment_key
from .guard import (PREFERENCE, UNSTEADY_SPREAD, EncoderVariant, choose_encoder, time_encoder_rounds,
                    unsteady_timings)
from .layers import (LayerShape, disagreement, discover_layers, layer_held_bytes, layer_results, model_signature,
                     time_kernel)
from .memory import MB, MEASURE as MEMORY_MEASURE, MemoryCheck, lighter_plan, parameters_bytes, step_peak_bytes
from .timing import Timer, WallClockTimer

__all__ = ["MODES", "AutotuneOptions", "AutotuneResult", "GuardDecision", "autotune", "load_plan_state"]

MODES = ("on", "cached", "off")
#: devices where ``masked`` is bit-reproducible from run to run (oneDNN), so that a resumed run equals an
#: uninterrupted one: there only kernels that declare the same (``REPRODUCIBLE_ON``) are candidates. On
#: CUDA cuDNN's default backward is not reproducible either, and every kernel competes.
REPRODUCIBLE_DEVICES = frozenset({"cpu"})
PLAN_FORMAT = "spark-sparse-autotune-plan/1"


def static_plan(static: dict[str, str], status: str = "static rule") -> dict[str, LayerDecision]:
    """The static rule's kernel for every layer, as decisions (what ``pin`` takes)."""
    return {name: LayerDecision(name, kernel, status) for name, kernel in static.items()}


def kernels_of(decisions: dict[str, LayerDecision]) -> dict[str, str]:
    """Layer name -> chosen kernel: the plan without its timings, for comparing plans."""
    return {name: decision.kernel for name, decision in decisions.items()}


@dataclass(frozen=True)
class AutotuneOptions:
    """How to tune. ``cache_dir=None``: the user cache folder (see :func:`.cache.cache_dir`).

    A candidate whose first timed call takes more than ``give_up_factor`` times the best time so far
    on its layer is not repeated (it cannot win). The whole-encoder guard takes ``guard_repeats``
    rounds and lets a variant replace a simpler one only when faster by more than ``guard_margin``
    (see :mod:`.guard`). ``memory_limit``: the most the step's peak may be, as a multiple
    of ``masked``'s (see :mod:`.memory`; ``None``: no limit).
    """

    mode: str = "on"
    budget_s: float = 60.0
    warmup: int = 1
    repeats: int = 3
    progress: bool = True
    cache_dir: Optional[Path] = None
    seed: int = 0
    give_up_factor: float = 3.0
    guard_repeats: int = 6
    guard_margin: float = 0.03
    memory_limit: Optional[float] = 1.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"--autotune {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.budget_s < 0 or self.repeats < 1 or self.warmup < 0 or self.guard_repeats < 1:
            raise ConfigError(f"autotune budget ({self.budget_s} s), repeats ({self.repeats}), guard repeats "
                              f"({self.guard_repeats}) and warmup ({self.warmup}) must be >= 0, >= 1, >= 1 and >= 0")
        if not 0.0 <= self.guard_margin < 1.0:
            raise ConfigError(f"autotune guard margin {self.guard_margin} must be a fraction in [0, 1)")
        if self.memory_limit is not None and not self.memory_limit > 0:
            raise ConfigError(f"autotune memory limit {self.memory_limit} must be > 0 (a multiple of masked's "
                              f"estimated step peak), or None for no limit")


@dataclass
class GuardDecision:
    """The whole-encoder comparison: ``choice`` is ``tuned``, ``static`` or ``masked``.

    ``ms``: variant -> median encoder forward+backward ms (empty when not measured); ``status``:
    ``measured``, ``cached``, ``checkpoint`` or why it was not measured.
    """

    choice: str
    ms: dict[str, float]
    status: str

    def describe(self) -> str:
        if not self.ms:
            return f"guard {self.status}"
        timings = ", ".join(f"{name} {ms:.4g} ms" for name, ms in self.ms.items())
        return f"guard ({self.status}) encoder fwd+bwd: {timings} -> {self.choice}"


@dataclass
class AutotuneResult:
    """What tuning decided. ``spark`` is the model to run: the tuned one, or its masked twin."""

    spark: nn.Module
    backend: str
    mode: str
    source: str
    device_type: str
    dtype: torch.dtype
    decisions: dict[str, LayerDecision] = field(default_factory=dict)
    guard: Optional[GuardDecision] = None
    seconds: float = 0.0
    shapes: str = ""
    memory: Optional[MemoryCheck] = None

    @property
    def applies(self) -> bool:
        return self.source != "not applicable"

    def plan_state(self) -> Optional[dict]:
        """Layer -> kernel and the guard's decision, for a checkpoint (``None`` when not an ``auto`` run)."""
        if not self.applies:
            return None
        return {"format": PLAN_FORMAT, "backend": self.backend, "device_type": self.device_type,
                "dtype": str(self.dtype).replace("torch.", ""), "mode": self.mode, "shapes": self.shapes,
                "kernels": kernels_of(self.decisions),
                "guard": None if self.guard is None else {"choice": self.guard.choice, "ms": dict(self.guard.ms)},
                "memory": None if self.memory is None else {"limit": self.memory.limit,
                                                            "peak_mb": dict(self.memory.peak_mb),
                                                            "params_mb": self.memory.params_mb,
                                                            "moved": dict(self.memory.moved)}}

    def summary(self) -> str:
        """One line: what runs and the measurement it rests on (or that none was made)."""
        if not self.applies:
            return f"backend {self.backend!r} has no measured dispatch"
        if self.source == "off":
            return "auto with --autotune off: the sparse backend's static rule, not measured here"
        counts: dict[str, int] = {}
        for decision in self.decisions.values():
            kind = decision.status.split(" ", 1)[0].rstrip(":;")
            counts[kind] = counts.get(kind, 0) + 1
        layers = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
        if self.guard is not None and self.guard.ms:
            timings = ", ".join(f"{name} {ms:.4g} ms" for name, ms in self.guard.ms.items())
            when = {"measured": "", "cached": " by an earlier run (cached)",
                    "checkpoint": " for the resumed run"}.get(self.guard.status, f" ({self.guard.status})")
            return (f"encoder fwd+bwd measured on this machine{when} at {self.shapes}: {timings} "
                    f"-> {self._verdict(self.guard.choice)}; layers: {layers}{self._memory_summary()}")
        guard = self.guard.status if self.guard is not None else "not measured"
        return (f"-> {self._verdict('tuned')}; layers: {layers}; encoder vs masked {guard}{self._memory_summary()}"
                f"{self._empty_cache_hint()}")

    def _verdict(self, choice: str) -> str:
        """What runs, and for ``masked`` why: no sparse plan was faster, or the faster ones peak above the limit."""
        if choice != "masked":
            return {"tuned": "auto (per-layer kernels)", "static": "auto (static rule)"}[choice]
        ms = self.guard.ms if self.guard is not None else {}
        faster = [name for name in ms if name != "masked" and ms[name] < ms.get("masked", math.inf)]
        if faster and self.memory is not None and not any(self.memory.fits(name) for name in faster):
            return "masked (the faster sparse plans peak above the memory limit)"
        return "masked (no sparse plan was faster here)"

    def _empty_cache_hint(self) -> str:
        """Why ``--autotune cached`` found nothing: the cache is per machine and software, kernels' source included."""
        if self.mode != "cached" or self.source != "measured" or any(
                d.status.startswith(("cached", "only")) for d in self.decisions.values()):
            return ""
        return ("; the cache holds no layer of this model for this device, library versions and kernel source "
                "(never tuned here, or an upgrade or kernel edit since): --autotune on measures them")

    def _memory_summary(self) -> str:
        return "" if self.memory is None else f"; {self.memory.describe()}"

    def headline(self) -> str:
        """How long tuning took and where the plan came from (the summary left out)."""
        made = {"measured": f"made by this run{self._layer_sources()}", "checkpoint": "the resumed run's",
                "off": "the static rule"}
        return f"[autotune] {self.seconds:.1f} s (--autotune {self.mode}; plan: {made.get(self.source, self.source)})"

    def _layer_sources(self) -> str:
        """Where a plan made by this run took its layers' timings from: a run that found every layer in the cache
        spent its time on the guard alone, which the headline's seconds would otherwise hide."""
        statuses = [d.status for d in self.decisions.values()]
        measured, cached = statuses.count("measured"), sum(s.startswith("cached") for s in statuses)
        return f", layers: {measured} measured now, {cached} from the cache" if measured or cached else ""

    def describe(self) -> str:
        """Several lines: the summary, then each layer's kernel and every candidate's measured ms."""
        lines = [f"{self.headline()}: {self.summary()}"]
        if self.decisions and self.guard is not None and self.guard.choice == "masked":
            lines.append("  the per-layer plan below was measured and is not used (the guard chose masked):")
        for name, decision in self.decisions.items():
            lines.append(f"  {name:<40} {decision.kernel:<10} {decision.describe()}")
        return "\n".join(lines)


class _Ranks:
    """Rank 0 decides, every rank applies its decision (a no-op outside a distributed run)."""

    def __init__(self):
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.is_main = not self.distributed or dist.get_rank() == 0

    def from_main(self, value):
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gathered(self, value) -> list:
        """Every rank's ``value``, in rank order (``[value]`` outside a distributed run)."""
        if not self.distributed:
            return [value]
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, value)
        return everyone

    def failures(self, error: Optional[BaseException]) -> list[str]:
        """``"rank r: Type: message"`` of every rank whose step raised, so that all ranks take the same fallback
        (one rank out of memory while the others went on would pair the ranks' collectives wrongly)."""
        mine = None if error is None else f"{type(error).__name__}: {error}"
        return [f"rank {rank}: {text}" for rank, text in enumerate(self.gathered(mine)) if text is not None]


def _dtype_named(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"autotune plan names an unknown dtype {name!r}")
    return dtype


def _masked_twin(spark: nn.Module, build_masked: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    """A SparK on ``masked`` with ``spark``'s parameters and buffers (the names do not depend on the backend)."""
    twin = build_masked().to(device)
    if twin.backend.name != "masked":
        raise ValueError(f"build_masked must build a SparK on the 'masked' backend, got {twin.backend.name!r}")
    twin.load_state_dict(spark.state_dict())
    if getattr(spark, "channels_last", False):
        twin.to_channels_last()
    return twin


def load_plan_state(spark: nn.Module, state: dict, build_masked: Optional[Callable[[], nn.Module]] = None
                    ) -> AutotuneResult:
    """Re-apply a plan from :meth:`AutotuneResult.plan_state` without measuring (exact resume)."""
    if not isinstance(state, dict) or state.get("format") != PLAN_FORMAT:
        raise ConfigError(f"not an autotune plan (expected format {PLAN_FORMAT!r}); it cannot be re-applied")
    backend = spark.backend
    if not isinstance(backend, AutoBackend):
        raise ConfigError(f"an autotune plan applies to the 'auto' backend, this model runs {backend.name!r}")
    device_type, dtype = state["device_type"], _dtype_named(state["dtype"])
    convs = dict(sparse_convs(spark.encoder))
    kernels = dict(state["kernels"])
    if set(kernels) != set(convs):
        extra, missing = sorted(set(kernels) - set(convs)), sorted(set(convs) - set(kernels))
        raise ConfigError(f"the autotune plan does not fit this model (layers only in the plan: {extra[:3]}, only in "
                          f"the model: {missing[:3]}); it was made for another model")
    decisions = {name: LayerDecision(name, kernel, "checkpoint") for name, kernel in kernels.items()}
    try:
        backend.pin(spark.encoder, device_type, dtype, decisions)
    except NoKernelError as err:
        raise ConfigError(f"the saved autotune plan cannot be applied here: {err}. Exact resume needs the kernels the "
                          f"interrupted run used: install them, or resume with --autotune off (the static rule; "
                          f"the run then continues on other kernels and is not bit-identical)") from None
    saved_guard = state.get("guard")
    guard = None if saved_guard is None else GuardDecision(saved_guard["choice"], saved_guard["ms"], "checkpoint")
    saved_memory = state.get("memory")
    memory = (None if saved_memory is None else
              MemoryCheck(saved_memory["limit"], saved_memory.get("peak_mb", {}), saved_memory["params_mb"],
                          saved_memory["moved"], "checkpoint"))
    result = AutotuneResult(spark, state["backend"], state.get("mode", "on"), "checkpoint", device_type, dtype,
                            decisions, guard, 0.0, state.get("shapes", ""), memory)
    if state["backend"] == "masked":
        if build_masked is None:
            raise ConfigError("the saved autotune plan runs the encoder on 'masked': pass build_masked to re-apply it")
        result.spark = _masked_twin(spark, build_masked, next(spark.parameters()).device)
    return result


def autotune(spark: nn.Module, batch_size: int, device: torch.device | str | None = None,
             amp_dtype: Optional[torch.dtype] = None, *, image_hw: Optional[tuple[int, int]] = None,
             channels_last: bool = False, options: AutotuneOptions = AutotuneOptions(),
             build_masked: Optional[Callable[[], nn.Module]] = None, timer: Optional[Timer] = None,
             plan_state: Optional[dict] = None) -> AutotuneResult:
    """Choose, pin and guard the kernels of ``spark`` (a SparK on ``auto``) for the run's shapes.

    ``batch_size`` images of ``image_hw`` (default: the model's input size) per process, under
    ``amp_dtype`` autocast (``None``: the parameters' dtype), ``channels_last`` as the run uses it.
    ``build_masked()`` builds the same SparK on ``masked`` (for the guard; without it the guard is
    skipped and says so). ``timer`` replaces the wall clock (tests). With ``plan_state`` (from a
    checkpoint) the saved plan is re-applied unless the mode is ``off``. A model on another backend
    is returned unchanged (``result.applies`` is false).

    Train ``result.spark``, and build the optimizer on its parameters after this call: when the guard
    finds ``masked`` faster, it is the masked twin, a model of its own with the same initial weights
    (``spark`` and an optimizer made on it are then left unused). A model on ``auto`` that is never tuned
    runs the static rule. Every candidate kernel's outputs and gradients are first checked against the
    static rule's kernel on each layer's shapes: one with other maths is warned about and never chosen.
    """
    param = next(spark.parameters())
    device = torch.device(device) if device is not None else param.device
    dtype = amp_dtype or param.dtype
    if not isinstance(spark.backend, AutoBackend):
        return AutotuneResult(spark, spark.backend.name, options.mode, "not applicable", device.type, dtype)
    forked = []
    if device.type == "cuda":
        forked = [device.index if device.index is not None else torch.cuda.current_device()]
    # tuning, and building the masked twin, leave the run's random streams as they were: a run that
    # re-applies a saved plan then draws the same numbers as the run that measured it
    with torch.random.fork_rng(devices=forked):
        if plan_state is not None and options.mode != "off":
            saved_for = (plan_state.get("device_type"), plan_state.get("dtype"))
            if saved_for == (device.type, str(dtype).replace("torch.", "")):
                return load_plan_state(spark, plan_state, build_masked)
            warnings.warn(f"the saved autotune plan was made for {saved_for[0]} {saved_for[1]}, this run computes "
                          f"on {device.type} {dtype}: tuning again", RuntimeWarning, stacklevel=2)
        tuner = _Tuner(spark, batch_size, device, dtype, amp_dtype, image_hw or spark.input_hw, channels_last,
                       options, build_masked, timer or WallClockTimer(device))
        with spark.backend.probing():
            return tuner.run()


class _Tuner:
    def __init__(self, spark, batch_size, device, dtype, amp_dtype, image_hw, channels_last, options, build_masked,
                 timer):
        self.spark, self.backend = spark, spark.backend
        self.batch_size, self.device, self.dtype, self.amp_dtype = batch_size, device, dtype, amp_dtype
        self.image_hw, self.channels_last, self.options = image_hw, channels_last, options
        self.build_masked, self.timer = build_masked, timer
        self.ranks = _Ranks()
        self.shapes = (f"batch {batch_size}, {image_hw[0]}x{image_hw[1]}, mask {spark.mask_ratio}, "
                       f"{device.type} {str(dtype).replace('torch.', '')}")

    def result(self, backend: str, source: str, decisions, guard, started: float, spark=None,
               memory: Optional[MemoryCheck] = None) -> AutotuneResult:
        return AutotuneResult(spark if spark is not None else self.spark, backend, self.options.mode, source,
                              self.device.type, self.dtype, decisions, guard, time.perf_counter() - started,
                              self.shapes, memory)

    def run(self) -> AutotuneResult:
        started = time.perf_counter()
        spark, options = self.spark, self.options
        grid = (self.image_hw[0] // spark.downsample_ratio, self.image_hw[1] // spark.downsample_ratio)
        active = ActiveMask.random(self.batch_size, grid, spark.mask_ratio, spark.downsample_ratio,
                                   generator=torch.Generator().manual_seed(options.seed), device=self.device).active
        convs = sparse_convs(spark.encoder)
        static = {name: self.backend.static_kernel(conv, self.device.type, self.dtype) for name, conv in convs}
        if options.mode == "off":
            decisions = static_plan(static, "autotune off: static rule")
            self.pin(decisions)
            return self.result("auto", "off", decisions, None, started)
        layers = discover_layers(spark, active)
        cache = TuneCache(environment_key(self.device), options.cache_dir) if self.ranks.is_main else None
        decisions = self.choose(layers, static, active, cache, started) if self.ranks.is_main else None
        decisions = self.ranks.from_main(decisions)
        for name, _ in convs:                      # convs the hierarchical forward never calls
            decisions.setdefault(name, LayerDecision(name, static[name], "not called: static rule"))
        self.pin(decisions)
        twin = None
        if self.build_masked is not None:
            twin = _masked_twin(spark, self.build_masked, self.device)
            if self.channels_last:
                spark.to_channels_last()
                twin.to_channels_last()
        param = next(spark.parameters())
        images = torch.randn(self.batch_size, 3, *self.image_hw,
                             generator=torch.Generator().manual_seed(options.seed)).to(self.device, param.dtype)
        decisions, memory = self.hold_to_limit(layers, decisions, static, active, twin, images)
        guard = self.guard(layers, decisions, static, active, cache, twin, images, memory)
        if cache is not None:
            cache.save()
        if guard.choice == "static":
            decisions = {name: LayerDecision(name, static[name], "static rule (guard: faster than the tuned plan)",
                                             d.ms) for name, d in decisions.items()}
            self.pin(decisions)
        if guard.choice == "masked":
            return self.result("masked", "measured", decisions, guard, started, spark=twin, memory=memory)
        return self.result("auto", "measured", decisions, guard, started, memory=memory)

    def pin(self, decisions: dict[str, LayerDecision]) -> None:
        self.backend.pin(self.spark.encoder, self.device.type, self.dtype, decisions)

    # ------------------------------------------------------------------ per layer
    def choose(self, layers: list[LayerShape], static: dict[str, str], active: torch.Tensor, cache: TuneCache,
               started: float) -> dict[str, LayerDecision]:
        groups: dict[str, list[LayerShape]] = {}
        for layer in layers:
            groups.setdefault(layer.key(self.device.type, self.dtype), []).append(layer)
        order = sorted(groups.items(), key=lambda item: -max(layer.work for layer in item[1]))
        reproducible = self.device.type in REPRODUCIBLE_DEVICES
        candidates = {key: group[0].conv.candidate_kernels(self.device.type, self.dtype, reproducible)
                      for key, group in order}
        to_measure = sum(1 for key, _ in order
                         if len(candidates[key]) > 1 and set(candidates[key]) - set(cache.layer(key)))
        decisions = {}
        with tqdm(total=to_measure if self.options.mode == "on" else 0, desc="[autotune] layers", unit="shape",
                  file=sys.stderr, disable=not self.options.progress or self.options.mode != "on" or not to_measure,
                  dynamic_ncols=True) as bar:
            for key, group in order:
                first, names = group[0], candidates[key]
                timings = {name: ms for name, ms in cache.layer(key).items() if name in names}
                status = "cached" if timings else ""
                missing = [name for name in names if name not in timings]
                if len(names) > 1 and missing:
                    if self.options.mode == "cached":
                        status = f"{status} (not measured: --autotune cached)".strip()
                    elif time.perf_counter() - started > self.options.budget_s:
                        status = f"{status} (budget of {self.options.budget_s:g} s exhausted)".strip()
                    else:
                        measured = self.measure(first, missing, static[first.name], timings, active)
                        cache.put_layer(key, measured)
                        timings.update(measured)
                        status = "measured"
                        bar.update()
                ran = {name: ms for name, ms in timings.items() if math.isfinite(ms)}   # inf: failed
                if len(names) == 1:
                    kernel, status = names[0], "only candidate"
                elif ran:
                    kernel = min(ran, key=ran.get)
                elif timings:
                    kernel, status = static[first.name], f"static rule, every candidate failed ({status})"
                else:
                    kernel, status = static[first.name], f"static rule, {status.strip('()')}"
                for layer in group:
                    decisions[layer.name] = LayerDecision(layer.name, kernel, status, dict(timings))
        return {layer.name: decisions[layer.name] for layer in layers}

    def measure(self, layer: LayerShape, kernels: list[str], static_kernel: str, known: dict[str, float],
                active: torch.Tensor) -> dict[str, float]:
        """Time ``kernels`` on ``layer``, the static rule's first (it sets the bar for giving up on the rest).

        A candidate is timed only once its outputs and gradients agree with the static rule's kernel on the
        layer's own shapes (when that kernel runs): a plug-in kernel with other maths must never win on speed."""
        best = min(known.values(), default=None)
        measured = {}
        reference = None
        if any(name != static_kernel for name in kernels):      # something to check against it
            try:
                reference = layer_results(layer, static_kernel, active, self.spark.downsample_ratio, self.dtype)
            except Exception:   # the static kernel's own failure is recorded when it is timed (or was, if cached)
                pass
        for name in sorted(kernels, key=lambda name: (name != static_kernel, name)):
            give_up = None if best is None else best * self.options.give_up_factor
            try:
                if reference is not None and name != static_kernel:
                    differs = disagreement(layer_results(layer, name, active, self.spark.downsample_ratio,
                                                         self.dtype), reference, self.dtype)
                    if differs:
                        warnings.warn(f"autotune: kernel {name!r} computes other numbers than {static_kernel!r} on "
                                      f"layer {layer.name} ({differs}); it is not used, and the cache records it as "
                                      f"failed (delete {CACHE_FILE} in the cache folder to try it again)",
                                      RuntimeWarning, stacklevel=2)
                        measured[name] = math.inf
                        continue
                ms = time_kernel(layer, name, active, self.spark.downsample_ratio, self.dtype, self.timer,
                                 self.options.warmup, self.options.repeats, give_up)
            except Exception as err:       # a candidate that fails (out of memory, a library bug) is not chosen
                warnings.warn(f"autotune: kernel {name!r} failed on layer {layer.name} ({type(err).__name__}: {err}); "
                              f"it is not used for this layer, and the cache records the failure (delete "
                              f"{CACHE_FILE} in the cache folder to try it again)", RuntimeWarning, stacklevel=2)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                measured[name] = math.inf        # cached: later runs neither retry it nor warn again
                continue
            measured[name] = ms
            best = ms if best is None else min(best, ms)
        return measured

    # ------------------------------------------------------------------ memory
    def hold_to_limit(self, layers: list[LayerShape], decisions: dict[str, LayerDecision], static: dict[str, str],
                      active: torch.Tensor, twin: Optional[nn.Module], images: torch.Tensor
                      ) -> tuple[dict[str, LayerDecision], MemoryCheck]:
        """Keep the step's peak within ``memory_limit`` x ``masked``'s (see :mod:`.memory`).

        The loss's forward and backward are measured on every rank in step (SyncBatchNorm); rank 0's
        numbers and moves apply.
        """
        limit = self.options.memory_limit
        if limit is None:
            return decisions, MemoryCheck(None, status="no limit")
        if twin is None:
            return decisions, MemoryCheck(limit, status="not measured (no masked model to compare with)")

        def peak_mb(model: nn.Module) -> float:
            try:
                peak, error = step_peak_bytes(model, images, active, self.amp_dtype) / MB, None
            except Exception as caught:
                peak, error = None, caught
            failures = self.ranks.failures(error)
            if error is not None:
                raise error
            if failures:
                raise RuntimeError(f"the memory check failed on another process ({'; '.join(failures)})")
            return self.ranks.from_main(peak)

        if self.options.progress and self.ranks.is_main:
            print(f"[autotune] memory: one forward and backward of each plan's step (limit {limit:g} x masked's "
                  f"peak)", file=sys.stderr, flush=True)
        check = MemoryCheck(limit, {"masked": peak_mb(twin)}, parameters_bytes(self.spark) / MB)
        try:
            check.peak_mb["tuned"] = peak_mb(self.spark)
        except Exception as err:      # e.g. out of memory at the run's batch: the static rule is the fallback
            if kernels_of(decisions) == static:
                raise
            warnings.warn(f"autotune: the tuned plan failed in its memory check ({type(err).__name__}: {err}); the "
                          f"static rule runs instead", RuntimeWarning, stacklevel=2)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            decisions = static_plan(static, "static rule (the tuned plan failed in the memory check)")
            self.pin(decisions)
            check.peak_mb["tuned"] = peak_mb(self.spark)
        if kernels_of(decisions) != static:
            self.pin(static_plan(static))
            check.peak_mb["static"] = peak_mb(self.spark)
            self.pin(decisions)
        if check.fits("tuned"):
            return decisions, check
        check.peak_mb["fastest"] = check.peak_mb["tuned"]
        decisions = dict(decisions)
        layer_held: dict[str, dict[str, int]] = {}
        while not check.fits("tuned"):
            to_free = int((check.peak_mb["tuned"] - check.peak_allowed_mb()) * MB) + 1
            moves = None
            if self.ranks.is_main:
                moves = {name: (kernel, (layer_held[name][decisions[name].kernel] - layer_held[name][kernel]) / MB)
                         for name, kernel in self.lighter_kernels(layers, decisions, active, layer_held,
                                                                  to_free).items()}
            moves = self.ranks.from_main(moves)
            if not moves:
                break
            for name, (kernel, freed) in moves.items():
                before = decisions[name]
                decisions[name] = LayerDecision(name, kernel, f"{before.status}; {kernel} for memory (holds {freed:.2g} "
                                                f"MB less than {before.kernel})", before.ms)
                check.moved[name] = kernel
            self.pin(decisions)
            check.peak_mb["tuned"] = peak_mb(self.spark)
        if not check.fits("tuned"):
            check.status = "the tuned plan holds more than the limit even on its lightest measured kernels"
        return decisions, check

    def lighter_kernels(self, layers: list[LayerShape], decisions: dict[str, LayerDecision], active: torch.Tensor,
                        layer_held: dict[str, dict[str, int]], to_free: int) -> dict[str, str]:
        """Moves that free ``to_free`` bytes at the least slowdown; ``layer_held`` caches per-layer bytes."""
        per_key: dict[str, dict[str, int]] = {}
        for layer in layers:
            if layer.name in layer_held or len(decisions[layer.name].ms) < 2:
                continue
            key = layer.key(self.device.type, self.dtype)
            if key not in per_key:
                per_key[key] = {}
                for kernel in decisions[layer.name].ms:
                    try:
                        per_key[key][kernel] = layer_held_bytes(layer, kernel, active, self.spark.downsample_ratio,
                                                                self.dtype)
                    except Exception as err:   # a candidate that fails here is not a move
                        warnings.warn(f"autotune: kernel {kernel!r} failed on layer {layer.name} while measuring its "
                                      f"memory ({type(err).__name__}: {err})", RuntimeWarning, stacklevel=2)
            layer_held[layer.name] = per_key[key]
        kernels = {name: d.kernel for name, d in decisions.items() if name in layer_held}
        return lighter_plan(kernels, {name: decisions[name].ms for name in kernels}, layer_held, to_free)

    # ------------------------------------------------------------------ whole encoder
    def guard(self, layers, decisions, static, active, cache, twin: Optional[nn.Module], images: torch.Tensor,
              memory: MemoryCheck) -> GuardDecision:
        """Tuned plan vs static rule vs masked on the whole encoder, among those within the memory limit."""
        tuned = kernels_of(decisions)
        within = [name for name in PREFERENCE if memory.fits(name) and (name != "static" or static != tuned)]
        default = "tuned" if "tuned" in within else within[-1] if within else "masked"
        if twin is None:
            return GuardDecision(default, {}, "not measured (no masked model to compare with)")
        key = canonical({"model": model_signature(self.spark, layers, self.device.type, self.dtype),
                         "batch": self.batch_size, "image_hw": list(self.image_hw), "mask": self.spark.mask_ratio,
                         "dtype": str(self.dtype), "amp": self.amp_dtype is not None,
                         "channels_last": self.channels_last, "plan": sorted(tuned.items()),
                         "memory_limit": self.options.memory_limit, "memory_measure": MEMORY_MEASURE})
        if self.options.mode != "on":
            # cached mode measures no time: the last guard result for this plan, if any
            cached = self.ranks.from_main(cache.encoder(key) if cache is not None else None)
            if cached is not None:
                return GuardDecision(cached["choice"], cached["ms"], "cached")
            return GuardDecision(default, {}, "not measured (--autotune cached)")
        # mode on times the guard on every run, even with a cached result: it is a few encoder calls,
        # and a decision taken under another machine load can be wrong now (seen here: a cached
        # 'tuned 13% faster' that ran 6% slower than the static rule in a later session)
        pin, static_decisions = self.pin, static_plan(static)
        variants = [EncoderVariant("tuned", self.spark, lambda: pin(decisions))]
        if static != tuned:
            variants.append(EncoderVariant("static", self.spark, lambda: pin(static_decisions)))
        variants.append(EncoderVariant("masked", twin))
        if self.options.progress and self.ranks.is_main:
            print(f"[autotune] guard: timing the encoder ({', '.join(v.name for v in variants)}) at {self.shapes}",
                  file=sys.stderr, flush=True)
        failed_here: set[str] = set()

        def failed(name: str, err: Exception) -> None:
            failed_here.add(name)
            warnings.warn(f"autotune guard: the {name} encoder failed ({type(err).__name__}: {err}); it does not "
                          f"compete", RuntimeWarning, stacklevel=2)

        rounds = time_encoder_rounds(variants, images, active, self.amp_dtype, self.timer, self.options.warmup,
                                     self.options.guard_repeats, on_failure=failed)
        pin(decisions)
        ms = {name: statistics.median(values) for name, values in rounds.items()}
        failed_anywhere = set().union(*self.ranks.gathered(failed_here))    # rank 0 must not choose what fails on 1
        ms = {name: value for name, value in ms.items() if name not in failed_anywhere}
        allowed = [name for name in ms if memory.fits(name)] or [min(ms, key=lambda name: memory.peak_mb[name])]
        choice = choose_encoder(ms, self.options.guard_margin, allowed)
        unsteady = unsteady_timings({name: rounds[name] for name in ms}, UNSTEADY_SPREAD)   # those that competed
        if unsteady and self.ranks.is_main:
            spans = ", ".join(f"{name} {low:.4g}-{high:.4g} ms over {len(rounds[name])} rounds"
                              for name, (low, high) in unsteady.items())
            processor = "GPU" if self.device.type == "cuda" else self.device.type.upper()
            warnings.warn(f"autotune guard: the encoder's timings varied widely from round to round (middle half of "
                          f"the rounds: {spans}), as when another process shares this {processor}: its choice "
                          f"({choice}) may not be the fastest, and is not cached; tune again on a quiet machine (a "
                          f"new run with --autotune on times the guard again)", RuntimeWarning, stacklevel=2)
        choice, ms = self.ranks.from_main((choice, ms))
        if cache is not None and not unsteady:            # a later --autotune cached run must not reuse it unwarned
            cache.put_encoder(key, {"choice": choice, "ms": ms})
        return GuardDecision(choice, ms, "measured")
