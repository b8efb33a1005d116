"""What one benchmark column is: a backend (SparK's recipe otherwise) or a whole speed recipe."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

import spark_sparse as ss
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

    def build(self, model: str, input_size: int, mask_ratio: float, device: str) -> ss.SparK:
        if self.recipe is None:
            spark = ss.create_spark(model, backend=self.base, input_size=input_size, mask_ratio=mask_ratio,
                                    drop_path_rate=0.0)
            return spark.to(device)
        plan = plan_speed(self.recipe, device)
        spark = ss.create_spark(model, backend=plan.backend, input_size=input_size, mask_ratio=mask_ratio,
                                drop_path_rate=0.0).to(device)
        return apply_speed_plan(spark, plan)

    def optimizer(self, spark: ss.SparK, model: str, device: str) -> torch.optim.Optimizer:
        foreach = plan_speed(self.recipe, device).foreach_optimizer if self.recipe else False
        return build_optimizer("lamb", param_groups(spark), 1e-4, default_beta2(model), 5.0, foreach=foreach)


def autocast(device: str, dtype: str):
    return torch.autocast(torch.device(device).type, dtype=DTYPES[dtype], enabled=dtype != "fp32")
