"""SparK's optimisation: parameter groups, optimizers and the per-iteration lr / wd schedule."""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Iterable

import torch
import torch.nn as nn
from timm.optim import Lamb

from ..timm_compat import timm_version

__all__ = ["NO_DECAY_KEYS", "param_groups", "build_optimizer", "default_beta2", "lr_wd_at", "apply_lr_wd",
           "OPTIMIZERS"]

#: SparK's ``nowd_keys``: names containing these never get weight decay
NO_DECAY_KEYS = ("cls_token", "pos_embed", "mask_token", "gamma")
OPTIMIZERS = ("lamb", "adamw", "sgd")


def param_groups(model: nn.Module, no_decay_keys: Iterable[str] = NO_DECAY_KEYS) -> list[dict]:
    """Two groups, as SparK's ``get_param_groups``: decayed weights, and the rest.

    No decay for 1-D parameters (norms, biases, layer-scale), any ``.bias``, and names containing
    :data:`NO_DECAY_KEYS` (mask tokens, ConvNeXt's ``gamma``). ``weight_decay_scale`` multiplies the
    scheduled weight decay of each group.
    """
    groups = {"decay": {"params": [], "names": [], "weight_decay_scale": 1.0, "lr_scale": 1.0},
              "no_decay": {"params": [], "names": [], "weight_decay_scale": 0.0, "lr_scale": 1.0}}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim == 1 or name.endswith(".bias") or any(k in name for k in no_decay_keys)
        group = groups["no_decay" if no_decay else "decay"]
        group["params"].append(param)
        group["names"].append(name)
    return [g for g in groups.values() if g["params"]]


def default_beta2(densify_norm: str) -> float:
    """SparK's ``--ada`` default, by the encoder's normalisation family.

    SparK sets 0.95 for its ResNets and 0.999 for its ConvNeXts, and densifies the former with
    BatchNorm, the latter with LayerNorm; keying on the densify norm extends the same rule to every
    family (BatchNorm CNNs such as ResNeXt, RegNet, EfficientNet: 0.95; LayerNorm ones: 0.999).
    """
    return 0.95 if densify_norm == "bn" else 0.999


def build_optimizer(name: str, groups: list[dict], lr: float, beta2: float, clip: float,
                    foreach: bool = False) -> torch.optim.Optimizer:
    """timm's LAMB (eps 1e-6, its own global-norm clipping at ``clip``), AdamW or SGD (Nesterov)."""
    groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    name = name.lower()
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=(0.9, beta2), eps=1e-6, weight_decay=0.0,
                    max_grad_norm=clip if clip > 0 else None, **_lamb_foreach(foreach))
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2), weight_decay=0.0, foreach=foreach)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=0.0, foreach=foreach)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def _lamb_foreach(foreach: bool) -> dict:
    """Lamb's ``foreach`` argument where this timm's Lamb takes one; older releases only update tensor by tensor
    (the same maths, more kernel launches), which a request for foreach updates is told about."""
    if "foreach" in inspect.signature(Lamb.__init__).parameters:
        return {"foreach": foreach}
    if foreach:
        warnings.warn(f"timm {timm_version()}'s Lamb has no foreach (multi-tensor) updates: it updates tensor by "
                      f"tensor, the same maths with more kernel launches; a newer timm has them", UserWarning,
                      stacklevel=3)
    return {}


def lr_wd_at(it: int, peak_lr: float, wd: float, wd_end: float, warmup_its: float, total_its: int) -> tuple[float, float]:
    """SparK's ``lr_wd_annealing`` at global iteration ``it``.

    lr: linear warm-up from 0.005 to 1 of ``peak_lr`` over ``warmup_its``, then cosine to 0.001 of it
    at the last iteration. wd: cosine from ``wd`` to ``wd_end`` over the whole run.
    """
    warmup_its = round(warmup_its)
    if it < warmup_its:
        lr = 0.005 * peak_lr + 0.995 * peak_lr * it / warmup_its
    else:
        ratio = (it - warmup_its) / max(1, total_its - 1 - warmup_its)
        lr = 0.001 * peak_lr + 0.999 * peak_lr * (0.5 + 0.5 * math.cos(math.pi * ratio))
    ratio = it / max(1, total_its - 1)
    return lr, wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * ratio))


def apply_lr_wd(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group["weight_decay"] = wd * group.get("weight_decay_scale", 1.0)
