"""timm's RegNets (X and Y): their blocks on every backend.

timm's RegNet ``Bottleneck`` calls ``conv1`` / ``conv2`` (grouped) / ``se`` / ``conv3`` (each a
``ConvNormAct``: conv, ``BatchNormAct2d``, an anti-aliasing slot: ``Identity`` or a blur pool), adds the
shortcut and applies ``act3``: containers all. RegNet-Y's SE is timm's ``SEModule`` (squeeze over
active sites, :mod:`~spark_sparse.backends.attention`).

Default drop path 0 (SparK pre-trained no model this small; its ``--dp`` default); densify norm
BatchNorm.
"""
from __future__ import annotations

from timm.models.regnet import Bottleneck, PreBottleneck, RegNet, RegStage

from ..backends import register_container
from .timm_encoders import register_timm_encoder

__all__ = []

for _composite in (RegNet, RegStage, Bottleneck, PreBottleneck):
    register_container(_composite)

register_timm_encoder("regnety_016", 0.0, densify_norm="bn", tested=True)
