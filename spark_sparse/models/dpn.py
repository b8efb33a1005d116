"""timm's DPN (dual path networks) on every backend.

A dual path block carries a residual path (its first channels, added to) and a dense path (the
rest, appended to) as channel slices of one map, joined with ``torch.cat(..., 1)``: every group holds
the same active sites, so these are exact on every backend (:class:`~spark_sparse.features.FeatureMap`).
Its ``BnAct`` / ``BnActConv2d`` layers are BatchNorm (+ activation) and convs the backends convert.

DPN takes no drop path (asking for one fails at creation); default drop path 0, densify norm BatchNorm.
"""
from __future__ import annotations

from timm.models.dpn import DPN, BnAct, BnActConv2d, DualPathBlock

from ..backends import register_container
from .timm_encoders import register_timm_encoder

__all__ = []

for _composite in (DPN, DualPathBlock, BnAct, BnActConv2d):
    register_container(_composite)

register_timm_encoder("dpn68", 0.0, densify_norm="bn", tested=True)
