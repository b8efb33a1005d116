"""timm's FastViT (Apple, ICCV 2023) with RepMixer token mixers on every backend.

FastViT trains re-parameterisable branches summed (MobileOne blocks: a BatchNorm identity, a 1x1
"scale" conv and k x k convs, each with its BatchNorm; large-kernel convs with a small-kernel
branch), mixes tokens with RepMixer, ``x + layer_scale(mixer(x) - norm(x))`` (two MobileOne
depthwise blocks; the difference of two maps of the same sites), and runs a ConvMlp (a depthwise
7x7 conv with BatchNorm, then 1x1 convs with GELU). Every part only calls its children, adds or
subtracts maps of the same sites and scales channels, so all of them are containers; sums started
from the number 0 (a MobileOne block without an identity branch) are exact
(:meth:`~spark_sparse.features.FeatureMap.__add__`).

The ``sa``/``ma`` variants' last stage is self-attention over every position of the map, masked ones
included: refused, naming the attention (their conditional positional encoding, ``x + dwconv(x)``,
would run). The
inference-mode (re-parameterised) model is not a training model and is not converted either.
Default drop path 0 (a 3.6M net; ``fastvit_s12`` and larger run by their timm names), densify norm
BatchNorm.
"""
from __future__ import annotations

from timm.models.fastvit import (Attention, AttentionBlock, ConvMlp, FastVit, FastVitStage, LayerScale2d,
                                 MobileOneBlock, PatchEmbed, RepConditionalPosEnc, ReparamLargeKernelConv, RepMixer,
                                 RepMixerBlock)

from ..backends import UnsupportedModuleError, register_container, register_converter
from .timm_encoders import register_timm_encoder

__all__ = []

for _composite in (FastVit, FastVitStage, PatchEmbed, ReparamLargeKernelConv, MobileOneBlock, RepMixer, RepMixerBlock,
                   ConvMlp, LayerScale2d, RepConditionalPosEnc, AttentionBlock):
    register_container(_composite)     # AttentionBlock: so that its Attention is refused by name, below


@register_converter(Attention)
def _refuse_global_attention(backend, attention: Attention, name: str):
    raise UnsupportedModuleError(
        f"{name}: FastViT's attention flattens the feature map into one token sequence and attends over all of "
        f"it, masked positions included, which has no sparse equivalent (the sa/ma variants' last stage); "
        f"pre-train a RepMixer FastViT (fastvit_t8, fastvit_t12, fastvit_s12) instead")


register_timm_encoder("fastvit_t8", 0.0, densify_norm="bn", tested=True)
