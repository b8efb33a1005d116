"""Helpers for checking a backend against ``masked`` on weights that exercise every branch.

timm starts residual branches switched off: the last BatchNorm's weight is 0 in ResNets
(``zero_init_last``), ByobNets, CSPNets, RegNets and RepViT; NF-Nets' gains and GCNet's last conv
are 0, GRN's weight is 0, ConvNeXt's and RDNet's layer scales are 1e-6. Compared at that
initialisation, a branch's convs get exactly zero (or 1e-6-scaled) gradients on both sides and the
features do not depend on them, so an equivalence check passes whatever the branch computes. The
test suite and ``benchmarks/compare_backends.py`` draw those parameters first.
"""
from __future__ import annotations

import torch
import torch.nn as nn

#: a parameter whose every entry is below this in magnitude counts as switching its branch off
SWITCHED_OFF_BELOW = 1e-4


def switch_branches_on(module: nn.Module, seed: int = 0, low: float = 0.5, high: float = 1.5) -> list[str]:
    """Draw every parameter of ``module`` that is all zero or all below :data:`SWITCHED_OFF_BELOW` in
    magnitude from U(low, high), in place; the names drawn, in ``named_parameters`` order.

    Draws come from a generator seeded with ``seed`` on the CPU, so every backend and device that
    starts from the same module gets the same weights. (In eval mode, where BatchNorm uses its
    initial running statistics, a deep net's activations grow with these gains: comparisons there
    should draw smaller ones.)
    """
    gen = torch.Generator().manual_seed(seed)
    drawn = []
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.numel() and float(param.abs().max()) < SWITCHED_OFF_BELOW:
                value = torch.empty(param.shape, dtype=param.dtype).uniform_(low, high, generator=gen)
                param.copy_(value.to(param.device))
                drawn.append(name)
    return drawn
