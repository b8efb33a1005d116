"""timm's MambaOut (CVPR 2025: "Do we really need Mamba for vision?") on every backend.

MambaOut is a channels-last net: its stem and downsampling layers permute to NHWC after each conv,
and its Gated CNN blocks run NHWC throughout: ``LayerNorm -> Linear -> split into (g, i, c) along
dim=-1``, a depthwise 7x7 conv on ``c`` (permuted to NCHW and back), ``Linear(act(g) * cat(i, c))``,
drop path and the residual add; ``forward_intermediates`` permutes each feature back to NCHW.
Every permute is between the two spellings of the same map
(:class:`~spark_sparse.features.ChannelsLastView`), the LayerNorms and Linear layers act on each
active site's channels, the gate is a site-by-site product of two maps of the same sites, so the
net, stem, downsampling, stages and blocks are containers: masked sites stay 0 throughout, the
depthwise conv reads them as the zeros they are in SparK.

Default drop path 0.1 (ConvNeXt-T's SparK rate; ``mambaout_tiny`` is a net of its size, the femto
and kobe sizes run by their timm names with 0 unless given), densify norm LayerNorm (the net's own).
"""
from __future__ import annotations

from timm.layers import LayerScale
from timm.models.mambaout import Downsample, DownsampleNormFirst, GatedConvBlock, MambaOut, MambaOutStage, Stem

from ..backends import register_container
from .timm_encoders import register_timm_encoder

__all__ = []

# timm's channels-last LayerScale, ``x * gamma`` with ``gamma`` of shape (C,): a per-channel factor on a
# channels-last view, refused on a channels-first map (where (C,) would scale the width)
for _composite in (MambaOut, Stem, Downsample, DownsampleNormFirst, MambaOutStage, GatedConvBlock, LayerScale):
    register_container(_composite)

register_timm_encoder("mambaout_tiny", 0.1, densify_norm="ln", tested=True)
