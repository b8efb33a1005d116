"""timm's RepViT, a re-parameterisable mobile CNN trained in its branched form (PP-LCNet-V2: ``lcnetv2``).

RepViT's token mixer (``RepVggDw``) is BatchNorm of the sum of a 3x3 and a 1x1 depthwise conv and the
input; its SE averages over each image's active sites; its channel mixer is a residual 1x1-conv MLP
(``ConvNorm``: conv then BatchNorm). Sums of maps of the same sites, containers all; the fused
inference form is not used while pre-training (timm's ``fuse()`` runs after it, on the plain timm
model the checkpoint loads into).

Default drop path 0 (SparK's default for small nets), densify norm BatchNorm.
"""
from __future__ import annotations

from timm.models.repvit import (ConvNorm, RepVggDw, RepVit, RepViTBlock, RepVitDownsample, RepVitMlp, RepVitStage,
                                RepVitStem)

from ..backends import register_container
from .timm_encoders import register_timm_encoder

__all__ = []

for _composite in (RepVit, RepVitStem, RepVitStage, RepVitDownsample, RepViTBlock, RepVggDw, RepVitMlp, ConvNorm):
    register_container(_composite)

register_timm_encoder("repvit_m0_9", 0.0, densify_norm="bn", tested=True)
