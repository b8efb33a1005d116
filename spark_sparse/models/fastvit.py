"""timm's FastViT (Apple, ICCV 2023) on every backend: RepMixer stages, and the sa/ma variants' attention stage.

FastViT trains re-parameterisable branches summed (MobileOne blocks: a BatchNorm identity, a 1x1
"scale" conv and k x k convs, each with its BatchNorm; large-kernel convs with a small-kernel
branch), mixes tokens with RepMixer, ``x + layer_scale(mixer(x) - norm(x))`` (two MobileOne
depthwise blocks; the difference of two maps of the same sites), and runs a ConvMlp (a depthwise
7x7 conv with BatchNorm, then 1x1 convs with GELU). Every part only calls its children, adds or
subtracts maps of the same sites and scales channels, so all of them are containers; sums started
from the number 0 (a MobileOne block without an identity branch) are exact
(:meth:`~spark_sparse.features.FeatureMap.__add__`).

The ``sa``/``ma`` variants' last stage adds a conditional positional encoding (``x + dwconv(x)``) and
attention blocks: BatchNorm, multi-head softmax self-attention among each image's ACTIVE tokens
(:class:`~spark_sparse.backends.token_attention.FeatureTokenAttention`: masked positions are neither
keys nor values), layer scales and a ConvMlp. The inference-mode (re-parameterised) model is not a
training model and is not converted.
Default drop path 0 (a 3.6M net; ``fastvit_s12`` and larger run by their timm names), densify norm
BatchNorm.
"""
from __future__ import annotations

from timm.models.fastvit import (Attention, AttentionBlock, ConvMlp, FastVit, FastVitStage, LayerScale2d,
                                 MobileOneBlock, PatchEmbed, RepConditionalPosEnc, ReparamLargeKernelConv, RepMixer,
                                 RepMixerBlock)

from ..backends import register_container, register_converter
from ..backends.token_attention import FeatureTokenAttention
from .timm_encoders import register_timm_encoder

__all__ = []

for _composite in (FastVit, FastVitStage, PatchEmbed, ReparamLargeKernelConv, MobileOneBlock, RepMixer, RepMixerBlock,
                   ConvMlp, LayerScale2d, RepConditionalPosEnc, AttentionBlock):
    register_container(_composite)

register_converter(Attention)(FeatureTokenAttention.of_map)


register_timm_encoder("fastvit_t8", 0.0, densify_norm="bn", tested=True)
register_timm_encoder("fastvit_sa12", 0.0, densify_norm="bn", tested=True)
