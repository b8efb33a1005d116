"""Measured per-layer kernel dispatch (the ``auto`` backend): tuning, its cache, the encoder guard.

Entry point: :func:`autotune` (see :mod:`.tuner`); :func:`load_plan_state` re-applies a saved plan.
"""
from .cache import CACHE_DIR_ENV, TuneCache, cache_dir
from .timing import Measurement, Timer, WallClockTimer
from .tuner import MODES, AutotuneOptions, AutotuneResult, GuardDecision, autotune, load_plan_state

__all__ = ["CACHE_DIR_ENV", "MODES", "AutotuneOptions", "AutotuneResult", "GuardDecision", "Measurement", "Timer",
           "TuneCache", "WallClockTimer", "autotune", "cache_dir", "load_plan_state"]
