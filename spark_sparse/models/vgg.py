"""timm's VGG (``vgg11`` .. ``vgg19``, with or without BatchNorm) on every backend.

VGG's features are one ``nn.Sequential`` of 3x3 convs, (BatchNorm,) ReLUs and 2x2 max-pools, all of
which every backend converts; the model class only runs that sequence (its ``ConvMlp`` pre-logits
and classifier are outside the hierarchy). Features at strides 4..32 are the ends of the stages
before each pool, timm's ``feature_info`` at those reductions.

VGG has no drop path (a drop path is refused at creation, "pre-train it with --dp 0"). Densify norm
BatchNorm.
"""
from __future__ import annotations

from timm.models.vgg import VGG

from ..backends import register_container
from .timm_encoders import register_timm_encoder

__all__ = []

register_container(VGG)
register_timm_encoder("vgg11_bn", 0.0, densify_norm="bn", tested=True)
