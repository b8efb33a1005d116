"""timm's FasterNet on every backend.

FasterNet's partial conv convolves the first channels only, ``split`` then ``cat``: both groups hold
the same active sites, so this is exact on every backend (:class:`~spark_sparse.features.FeatureMap`).
Its per-channel layer scale multiplies every active site; the rest is layers the backends convert.

Options without an exact meaning on active sites are refused: the inference-only
``pconv_fw_type='slicing'`` (assigns into a slice) and memory-efficient checkpointing fail on the
first training forward naming the torch function (:class:`~spark_sparse.features.UnsupportedFeatureOperation`).

Default drop path 0 (SparK's ``--dp`` default), densify norm BatchNorm.
"""
from __future__ import annotations

from timm.models.fasternet import Block as FasterNetStage
from timm.models.fasternet import FasterNet, MLPBlock, Partial_conv3, PatchEmbed, PatchMerging

from ..backends import register_container
from .timm_encoders import register_timm_encoder

__all__ = []

for _composite in (FasterNet, FasterNetStage, PatchEmbed, PatchMerging, MLPBlock, Partial_conv3):
    register_container(_composite)

register_timm_encoder("fasternet_t0", 0.0, densify_norm="bn", tested=True)
