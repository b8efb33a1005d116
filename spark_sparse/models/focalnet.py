"""timm's FocalNet (NeurIPS 2022: "Focal Modulation Networks") on every backend.

FocalNet replaces self-attention by focal modulation, which is convolutional throughout: a 1x1 conv
``f`` makes a query ``q``, a context ``ctx`` and ``L + 1`` one-channel gates; ``L`` depthwise convs
(each with GELU, growing kernels) refine the context level by level, each level weighted by its own
gate; a global context, GELU of the context's average over the image, is weighted by the last gate;
their sum, through a 1x1 conv ``h``, modulates ``q`` site by site; a 1x1 conv projects it. Blocks
are pre-norm (LayerNorm2d) with an MLP of 1x1 convs and optional layer scales; stem and downsampling
are strided convs with LayerNorm2d.

Everything but the global context runs on feature maps as timm writes it (channel split, channel
slices, site-by-site products, a one-channel gate broadcast over the channels), so the net, stages,
blocks and downsampling are containers. The global context is an average over the image, so
:class:`FeatureFocalModulation` takes it over each image's ACTIVE sites, as squeeze-excitation does
here (masked patches are not part of the image the encoder sees), and spreads it only to active
sites through the last gate: masked sites stay 0. With every patch visible this is timm's maths.

Default drop path 0.1 (ConvNeXt-T's SparK rate; ``focalnet_tiny_srf`` is a net of its size; the
other sizes run by their timm names with 0 unless given), densify norm LayerNorm (the net's own).
"""
from __future__ import annotations

import torch.nn as nn
from timm.models.focalnet import Downsample, FocalModulation, FocalNet, FocalNetBlock, FocalNetStage

from ..backends import register_container, register_converter
from ..backends.common import adopt_module
from ..backends.per_image import image_means, scale_per_image
from ..features import FeatureMap
from .timm_encoders import register_timm_encoder

__all__ = ["FeatureFocalModulation"]

for _composite in (FocalNet, FocalNetStage, FocalNetBlock, Downsample):
    register_container(_composite)


@register_converter(FocalModulation)
class FeatureFocalModulation(nn.Module):
    """timm's ``FocalModulation`` with its global context averaged over each image's active sites.

    The same children, names and parameters; all but ``act`` are converted to the backend's layers
    (``act`` also applies GELU to the dense ``[B, C]`` global context, so it stays torch's)."""

    def __init__(self, backend, modulation: FocalModulation, name: str = ""):
        super().__init__()
        adopt_module(self, modulation)
        backend.convert_children(self, prefix=f"{name}.", skip=frozenset({f"{name}.act"}))
        self.input_split = list(modulation.input_split)
        self.focal_level = modulation.focal_level
        self.normalize_modulator = modulation.normalize_modulator

    def forward(self, x: FeatureMap) -> FeatureMap:
        q, ctx, gates = self.f(x).split(self.input_split, 1)
        ctx_all = 0
        for level, focal_layer in enumerate(self.focal_layers):
            ctx = focal_layer(ctx)
            ctx_all = ctx_all + ctx * gates[:, level:level + 1]
        ctx_global = self.act(image_means(ctx))                                # [B, C], per image
        # the one-channel last gate times each image's context: C channels at its active sites
        ctx_all = ctx_all + scale_per_image(gates[:, self.focal_level:], ctx_global)
        if self.normalize_modulator:
            ctx_all = ctx_all.with_data(ctx_all.data / (self.focal_level + 1))
        out = self.norm(q * self.h(ctx_all))
        return self.proj_drop(self.proj(out))


register_timm_encoder("focalnet_tiny_srf", 0.1, densify_norm="ln", tested=True)
