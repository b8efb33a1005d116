"""Speed recipes: which equivalent-maths options a run switches on, and why.

``spark`` reproduces SparK's recipe exactly (masked backend, NCHW, fp32, no compile) and is the
baseline every speed claim is measured against. ``fast`` switches on every option that keeps the
fp32 maths: the ``auto`` backend (each conv on the kernel measured fastest on this machine, the
encoder on ``masked`` when that is not faster, see :mod:`spark_sparse.autotune`), channels_last for
the dense parts and, on CUDA only, foreach optimizer updates and ``torch.compile`` of the decoder. Mixed
precision (``--amp``) changes the maths, so it stays a separate choice. Explicit flags override a
recipe.

Every printed reason cites what was measured on this machine in this run (the autotune's encoder
timings, once :meth:`SpeedPlan.with_autotune` has recorded them) or says that it was not measured
here: timings from another machine are no reason for this one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

from .autotune.memory import held_bytes
from .backends import list_backends

if TYPE_CHECKING:
    from .autotune import AutotuneResult

__all__ = ["SpeedPlan", "RECIPES", "plan_speed", "apply_speed_plan", "estimate_max_batch", "BatchEstimate"]

RECIPES = ("spark", "fast")


@dataclass(frozen=True)
class SpeedPlan:
    recipe: str
    backend: str
    channels_last: bool
    compile_decoder: bool
    grad_ckpt: bool
    foreach_optimizer: bool
    why: dict = field(default_factory=dict)

    def describe(self) -> str:
        lines = [f"speed recipe {self.recipe!r}:"]
        for key in ("backend", "channels_last", "compile_decoder", "grad_ckpt", "foreach_optimizer"):
            lines.append(f"  {key:<17} = {getattr(self, key)!s:<8} {self.why.get(key, '')}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return asdict(self)

    def with_autotune(self, result: "AutotuneResult") -> "SpeedPlan":
        """This plan after autotuning: the backend that runs (``masked`` when the guard chose it) and why.

        A plan whose backend is not ``auto`` (or whose model was not tuned) is returned unchanged.
        """
        if self.backend != "auto" or not result.applies:
            return self
        return replace(self, backend=result.backend, why={**self.why, "backend": result.summary()})


#: the ``fast`` recipe's backend, and what replaces it when it is not registered
_MEASURED_BACKEND = "auto"


def _fastest_equivalent_backend() -> tuple[str, str]:
    available = {info.name for info in list_backends() if info.available}
    if _MEASURED_BACKEND in available:
        return _MEASURED_BACKEND, ("each conv on the kernel measured fastest on this machine before the first step, "
                                   "the encoder on masked if that is not faster (not measured yet)")
    return "masked", f"no measured-dispatch backend is available here ({_MEASURED_BACKEND!r} not registered)"


def plan_speed(recipe: str, device: torch.device | str, *, backend: Optional[str] = None,
               channels_last: Optional[bool] = None, compile_decoder: Optional[bool] = None,
               foreach_optimizer: Optional[bool] = None, grad_ckpt: bool = False) -> SpeedPlan:
    """Resolve a recipe for ``device``; explicit arguments (not ``None``) override it."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    device_type = torch.device(device).type
    why: dict[str, str] = {}
    if recipe == "spark":
        chosen = dict(backend="masked", channels_last=False, compile_decoder=False, foreach_optimizer=False)
        why = {k: "SparK's recipe" for k in chosen}
    else:
        name, reason = _fastest_equivalent_backend()
        chosen = dict(backend=name, channels_last=True, foreach_optimizer=device_type == "cuda",
                      compile_decoder=device_type == "cuda")
        why = {"backend": reason,
               "channels_last": "NHWC is the layout oneDNN and cuDNN convolutions prefer (not measured here)",
               "foreach_optimizer": ("multi-tensor kernels update all tensors in a few launches on CUDA (not "
                                     "measured here)" if device_type == "cuda" else
                                     "per-tensor updates on CPU, where foreach kernels bring no launch savings "
                                     "(not measured here)"),
               "compile_decoder": ("torch.compile fuses the decoder's BN/ReLU6 chains on CUDA (not measured here)"
                                   if device_type == "cuda" else
                                   "off on CPU, where the decoder is bound by oneDNN convolutions (not measured "
                                   "here)")}
    overrides = (("backend", backend), ("channels_last", channels_last), ("compile_decoder", compile_decoder),
                 ("foreach_optimizer", foreach_optimizer))
    for key, value in overrides:
        if value is not None and value != chosen[key]:
            chosen[key] = value
            why[key] = "set explicitly"
    why["grad_ckpt"] = "set explicitly (saves decoder activations, costs a recompute)" if grad_ckpt else "off unless asked"
    return SpeedPlan(recipe=recipe, grad_ckpt=grad_ckpt, why=why, **chosen)


def apply_speed_plan(spark: nn.Module, plan: SpeedPlan) -> nn.Module:
    """Switch the model-side options of ``plan`` on (the backend is chosen when building the model)."""
    if plan.backend != spark.backend.name:
        raise ValueError(f"speed plan wants backend {plan.backend!r} but the model runs {spark.backend.name!r} "
                         f"(after autotuning, apply plan.with_autotune(result) with the model result.spark)")
    if plan.channels_last:
        spark.to_channels_last()
    if plan.grad_ckpt:
        spark.set_grad_checkpointing(True)
    if plan.compile_decoder:
        spark.decoder.compile()
    return spark


@dataclass(frozen=True)
class BatchEstimate:
    activation_mb_per_image: float
    static_mb: float
    budget_mb: float
    max_batch: int

    def describe(self, device: str) -> str:
        return (f"memory estimate on {device}: {self.activation_mb_per_image:.1f} MB of saved activations per image, "
                f"{self.static_mb:.0f} MB for weights, gradients, optimizer state and what a step holds whatever its "
                f"batch (e.g. autocast's weight copies), budget {self.budget_mb:.0f} MB -> largest batch per device "
                f"about {self.max_batch}")


def _memory_budget_mb(device: torch.device) -> float:
    """Memory a run may use, in MB: a GPU's total memory, or the RAM available now (psutil: any OS)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1] / 2**20
    import psutil

    return psutil.virtual_memory().available / 2**20


def _saved_activation_bytes(spark: nn.Module, images: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one forward (distinct storages, parameters excluded)."""
    return held_bytes(lambda: spark(images), exclude=list(spark.parameters()))


def estimate_max_batch(spark: nn.Module, image_hw: tuple[int, int], device: torch.device | str,
                       optimizer_states_per_param: int = 2, probe_batch: int = 2,
                       amp_dtype: Optional[torch.dtype] = None) -> BatchEstimate:
    """Estimate the largest batch that fits, from the activations saved at a small probe batch.

    Static memory counts parameters, gradients and ``optimizer_states_per_param`` optimizer
    tensors per parameter (LAMB/AdamW: 2), plus what a forward saves whatever its batch; 10% of
    the budget is kept for allocator slack and workspace. Two probe forwards (``probe_batch`` and
    twice that) in training mode, under the run's autocast ``amp_dtype``, separate the per-image
    part from the fixed one: under autocast each weight's half-precision copy is saved once per
    step (for ResNet-18 at 64 px, four times the per-image activations at a probe of two images).
    BN statistics are restored afterwards.
    """
    device = torch.device(device)
    buffers = {k: v.clone() for k, v in spark.state_dict().items()}
    images = torch.randn(2 * probe_batch, 3, *image_hw, device=device)
    with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        small, large = (_saved_activation_bytes(spark, images[:n]) / 2**20 for n in (probe_batch, 2 * probe_batch))
    spark.load_state_dict(buffers)
    per_image = max(large - small, 0.0) / probe_batch
    fixed = max(small - per_image * probe_batch, 0.0)
    param_mb = sum(p.numel() * p.element_size() for p in spark.parameters()) / 2**20
    static = param_mb * (2 + optimizer_states_per_param) + fixed
    budget = _memory_budget_mb(device) * 0.9
    return BatchEstimate(per_image, static, budget, max(0, int((budget - static) // max(per_image, 1e-9))))
