"""What one benchmark column is: a backend (SparK's recipe otherwise) or a whole speed recipe.

A column on the ``auto`` backend (``auto`` itself, or ``recipe:fast``) is tuned before it is timed,
by :func:`tune_workload`, for the configuration's batch, dtype and mask ratio, as training tunes
before its first step; the tuning time is reported beside the timings, never inside them.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Optional

import torch

import spark_sparse as ss
from spark_sparse.autotune import MODES, AutotuneOptions, AutotuneResult, autotune
from spark_sparse.decoder import SPARK_DECODER_WIDTH
from spark_sparse.errors import ConfigError
from spark_sparse.models.model_kwargs import parse_model_kwargs
from spark_sparse.speed import apply_speed_plan, plan_speed
from spark_sparse.train.optim import build_optimizer, default_beta2, param_groups

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Variant:
    """``backend`` alone (NCHW, no compile: only the backend differs) or ``recipe:<name>``.

    A ``@<dtype>`` suffix (``recipe:fast@bf16``) runs that variant under its own autocast dtype,
    so a mixed-precision recipe can be timed against SparK's fp32 recipe in the same run.
    """

    name: str

    @property
    def base(self) -> str:
        return self.name.split("@", 1)[0]

    @property
    def dtype(self) -> Optional[str]:
        return self.name.split("@", 1)[1] if "@" in self.name else None

    @property
    def recipe(self) -> Optional[str]:
        return self.base.split(":", 1)[1] if self.base.startswith("recipe:") else None

    def build(self, model: str, input_size: int, mask_ratio: float, device: str,
              backend: Optional[str] = None, model_kwargs: Optional[dict] = None,
              decoder_width: int = SPARK_DECODER_WIDTH) -> ss.SparK:
        """The column's model; ``backend`` replaces the column's (the autotune guard's masked twin);
        ``model_kwargs``: the model constructor's own arguments (``--model-kwargs``); ``decoder_width``:
        spark-pretrain's ``--decoder_width``."""
        spark_kwargs = dict(input_size=input_size, mask_ratio=mask_ratio, drop_path_rate=0.0,
                            decoder_width=decoder_width)
        if self.recipe is None:
            return ss.create_spark(model, backend=backend or self.base, **spark_kwargs, **(model_kwargs or {})
                                   ).to(device)
        plan = plan_speed(self.recipe, device)
        plan = replace(plan, backend=backend) if backend else plan
        spark = ss.create_spark(model, backend=plan.backend, **spark_kwargs, **(model_kwargs or {})).to(device)
        return apply_speed_plan(spark, plan)

    def optimizer(self, spark: ss.SparK, model: str, device: str) -> torch.optim.Optimizer:
        foreach = plan_speed(self.recipe, device).foreach_optimizer if self.recipe else False
        return build_optimizer("lamb", param_groups(spark), 1e-4, default_beta2(spark.densify_norm_kind), 5.0, foreach=foreach)


def add_model_kwargs_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--model-kwargs KEY=VALUE ...``: words as spark-pretrain's ``--model_kwargs`` takes them (kept as words, so
    that a subprocess is handed the same ones; :func:`parse_model_kwargs_argument` reads them)."""
    parser.add_argument("--model-kwargs", "--model_kwargs", nargs="+", default=[], metavar="KEY=VALUE", help=help)


def add_autotune_arguments(parser: argparse.ArgumentParser) -> None:
    """``--autotune`` and ``--autotune-budget``: how columns on backend ``auto`` (``recipe:fast``) are tuned before
    they are timed, as spark-pretrain tunes before its first step (the tuning time is never in the timings)."""
    parser.add_argument("--autotune", choices=MODES, default="on",
                        help="columns on backend auto (and recipe:fast) are tuned before timing: on = measure what the "
                             "cache lacks, cached = the cache only, off = the static rule (tuning time reported apart)")
    parser.add_argument("--autotune-budget", type=float, default=60.0, help="seconds of per-layer tuning at most")


def parse_model_kwargs_argument(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``args.model_kwargs_values``: the dict the words give, or the parser's usage error with spark-pretrain's
    message."""
    try:
        args.model_kwargs_values = parse_model_kwargs(args.model_kwargs)
    except ConfigError as err:
        parser.error(str(err))


def autocast(device: str, dtype: str):
    return torch.autocast(torch.device(device).type, dtype=DTYPES[dtype], enabled=dtype != "fp32")


def tune_workload(work, dtype: str, mode: str = "on", budget_s: float = 60.0) -> AutotuneResult:
    """Tune ``work`` (a ``_measure.Workload``) for ``dtype`` if its model runs ``auto``; before timing it.

    The tuned model, or the masked twin when the guard chooses it, becomes ``work.spark`` (with a new
    optimizer over its parameters). The untuned ``auto`` model is kept on the workload, so a later
    dtype of the same configuration is tuned from it again.
    """
    base = getattr(work, "untuned_spark", work.spark)
    if base.backend.name != "auto":
        return autotune(base, work.images.shape[0], work.device)          # not applicable: says so
    work.untuned_spark = base
    input_size = work.images.shape[-1]
    amp = None if dtype == "fp32" else DTYPES[dtype]
    result = autotune(base, work.images.shape[0], work.device, amp, channels_last=base.channels_last,
                      options=AutotuneOptions(mode=mode, budget_s=budget_s),
                      build_masked=lambda: work.variant.build(work.model, input_size, base.mask_ratio, work.device,
                                                              backend="masked", model_kwargs=work.model_kwargs,
                                                              decoder_width=work.decoder_width))
    if result.spark is not work.spark:
        work.spark = result.spark
        work.optimizer = work.variant.optimizer(work.spark, work.model, work.device)
    return result


def autotune_record(result: Optional[AutotuneResult]) -> Optional[dict]:
    """What a results row keeps of the tuning (``None`` for columns that are not tuned)."""
    if result is None or not result.applies:
        return None
    return {"runs": result.backend, "mode": result.mode, "source": result.source,
            "tuning_s": round(result.seconds, 2), "summary": result.summary(),
            "guard_ms": result.guard.ms if result.guard is not None else None,
            "peak_mb": result.memory.peak_mb if result.memory is not None else None,
            "moved_for_memory": result.memory.moved if result.memory is not None else None,
            "kernels": {name: d.kernel for name, d in result.decisions.items()}}
