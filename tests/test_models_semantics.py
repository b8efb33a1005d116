"""The sparse semantics of timm's layers on ``masked`` (the reference), as docs/sparse_semantics.md states them.

Every sparse backend is compared with ``masked`` elsewhere (tests/test_equivalence_layers.py); here the
reference itself is checked against the written formulas (statistics over each image's ACTIVE sites,
masked sites exactly zero) and, with every site visible, against timm's own dense layers.
"""
import copy
import math
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import (Attention, BatchNormAct2d, Conv2dSame, EcaModule, GlobalContext, GroupNormAct, LayerScale2d,
                         MixedConv2d, ScaledStdConv2d, SEModule, SpaceToDepth, StdConv2d)
from timm.layers.attention2d import MultiQueryAttention2d
from timm.layers.blur_pool import BlurPool2d
from timm.layers.grn import GlobalResponseNorm
from timm.models.davit import ChannelBlock as DavitChannelBlock
from timm.models.davit import SpatialBlock as DavitSpatialBlock
from timm.models.edgenext import SplitTransposeBlock
from timm.models.efficientformer import Attention as EfficientFormerAttention
from timm.models.pvt_v2 import Attention as PvtAttention
from timm.models.pvt_v2 import PyramidVisionTransformerStage
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, SwinTransformerStage
from timm.models.swin_transformer_v2 import SwinTransformerV2, SwinTransformerV2Block, SwinTransformerV2Stage
from timm.models.swin_transformer_v2 import WindowAttention as SwinV2WindowAttention
from timm.models.twins import Block as TwinsBlock
from timm.models.twins import LocallyGroupedAttn
from timm.models.twins import PosConv as TwinsPosConv
from timm.models.efficientvit_mit import LiteMLA
from timm.models.focalnet import FocalModulation
from timm.models.mobilevit import LinearSelfAttention, MobileVitBlock, MobileVitV2Block
from timm.models.swiftformer import EfficientAdditiveAttention
from timm.models.metaformer import Attention as MetaFormerAttention
from timm.models.metaformer import GroupNorm1NoBias, LayerNorm2dNoBias, Pooling, StarReLU
from timm.models.nfnet import GammaAct
from timm.models._efficientnet_blocks import CondConvResidual, SqueezeExcite

import spark_sparse as ss
from spark_sparse import ActiveMask, MaskedDense
from spark_sparse.features import ChannelsLastView, UnsupportedFeatureOperation
from spark_sparse.backends.pools import ConstantPadMaxPool2d, fold_zero_pad_into_max_pool

from test_equivalence_layers import randomized, scaled

ALL_BACKENDS = ["masked", "torch"]   # the reference and one true-sparse backend (the others are compared to masked)


def _mask() -> ActiveMask:
    """Two images of 3x3 patches, 4 and 2 visible: per-image statistics must differ from batch ones."""
    active = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    active[0, 0, 0, :2] = active[0, 0, 2, 1:] = True
    active[1, 0, 1, 1] = active[1, 0, 2, 0] = True
    return ActiveMask(active)


def _masked_run(layer: nn.Module, x: torch.Tensor, mask: ActiveMask, stride: int = 4) -> torch.Tensor:
    converted = ss.create_backend("masked").convert(nn.Sequential(copy.deepcopy(layer)))
    return converted(MaskedDense(x * mask.dense_at(stride), mask, stride)).data


def _input(mask: ActiveMask, channels: int = 8, stride: int = 4) -> torch.Tensor:
    site = mask.dense_at(stride)
    return torch.randn(mask.batch_size, channels, *site.shape[-2:], dtype=torch.float64) * site


def _active_values(x: torch.Tensor, mask: ActiveMask, image: int, stride: int = 4) -> torch.Tensor:
    """``[n, C]``: the active sites of one image."""
    return x[image].permute(1, 2, 0)[mask.dense_at(stride)[image, 0]]


def _feature_map(backend: str, x: torch.Tensor, mask: ActiveMask, stride: int = 4):
    """``x`` (zero at masked sites) as the map ``backend`` consumes: dense for ``masked``, its active rows else."""
    if backend == "masked":
        return MaskedDense(x, mask, stride)
    return ss.SparseRows(x.permute(0, 2, 3, 1)[mask.dense_at(stride)[:, 0]], mask, stride)


def test_squeeze_excitation_squeezes_over_each_images_active_sites_only():
    mask, se = _mask(), randomized(SEModule(8, rd_channels=4)).double()
    x = _input(mask)
    out = _masked_run(se, x, mask)
    for image in range(2):
        mean = _active_values(x, mask, image).mean(0).view(1, 8, 1, 1)
        gate = se.gate(se.fc2(se.act(se.bn(se.fc1(mean)))))
        torch.testing.assert_close(out[image], (x[image:image + 1] * gate)[0])


def test_efficientnet_squeeze_excite_with_a_gate_nonzero_at_zero_keeps_masked_sites_zero():
    mask = _mask()
    se = randomized(SqueezeExcite(8, rd_channels=4, gate_layer=nn.Hardsigmoid)).double()
    out = _masked_run(se, _input(mask), mask)
    assert torch.all(out[~mask.dense_at(4).expand_as(out)] == 0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_star_relu_runs_on_active_sites_and_its_bias_never_reaches_masked_ones(backend):
    """ConvFormer's ``scale * relu(x) ** 2 + bias`` is ``bias`` at 0: a depthwise conv after it must not
    read ``bias`` from masked sites (SparK's masked dense conv would, if the activation were not masked)."""
    mask, act = _mask(), randomized(StarReLU()).double()
    layer = nn.Sequential(act, randomized(nn.Conv2d(8, 8, 7, padding=3, groups=8)).double())
    x = _input(mask)
    converted = ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(layer)))
    site = mask.dense_at(4)
    fmap = _feature_map(backend, x, mask)
    out = converted(fmap).to_dense()
    expected = layer[1]((act.scale * torch.relu(x) ** 2 + act.bias) * site) * site
    assert float(act.bias.detach().abs()) > 0.1
    torch.testing.assert_close(out, expected)


def test_eca_squeezes_over_active_sites_only():
    mask, eca = _mask(), randomized(EcaModule(channels=8)).double()
    x = _input(mask)
    out = _masked_run(eca, x, mask)
    for image in range(2):
        mean = _active_values(x, mask, image).mean(0).view(1, 1, 8)
        gate = eca.gate(eca.conv(mean)).view(1, 8, 1, 1)
        torch.testing.assert_close(out[image], (x[image:image + 1] * gate)[0])


@pytest.mark.parametrize("fuse_add", [False, True])
def test_global_context_attends_over_each_images_active_sites_only(fuse_add):
    """GCNet's attention pooling: softmax of the attention logits over each image's active sites, the
    context through the module's own MLPs; the add branch adds only at active sites."""
    mask = _mask()
    gc = randomized(GlobalContext(8, fuse_add=fuse_add, fuse_scale=True, rd_channels=4)).double()
    x = _input(mask)
    out = _masked_run(gc, x, mask)
    site = mask.dense_at(4)
    assert torch.all(out[~site.expand_as(out)] == 0)
    for image in range(2):
        values = _active_values(x, mask, image)                              # [n, C]
        weights = torch.softmax(values @ gc.conv_attn.weight.view(8) + gc.conv_attn.bias, dim=0)
        context = (weights[:, None] * values).sum(0).view(1, 8, 1, 1)
        expected = x[image:image + 1] * gc.gate(gc.mlp_scale(context))
        if fuse_add:
            expected = expected + gc.mlp_add(context) * site[image:image + 1]
        torch.testing.assert_close(out[image], expected[0])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_focal_modulation_averages_its_global_context_over_each_images_active_sites(backend):
    """FocalNet's modulation, written out on the dense masked map: every conv's output times the mask
    (SparK), the global context the mean over each image's ACTIVE sites, reaching active sites only."""
    mask = _mask()
    layer = randomized(FocalModulation(8, focal_window=3, focal_level=2, normalize_modulator=True)).double()
    x, site = _input(mask), mask.dense_at(4).double()
    f = layer.f(x) * site
    q, ctx, gates = torch.split(f, layer.input_split, 1)
    ctx_all = 0
    for level, focal_layer in enumerate(layer.focal_layers):
        ctx = focal_layer(ctx) * site
        ctx_all = ctx_all + ctx * gates[:, level:level + 1]
    active_mean = ctx.sum((2, 3), keepdim=True) / site.sum((2, 3), keepdim=True)
    ctx_all = (ctx_all + layer.act(active_mean) * gates[:, 2:]) / 3
    expected = layer.proj(q * (layer.h(ctx_all) * site)) * site
    converted = ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(layer)))
    fmap = _feature_map(backend, x, mask)
    torch.testing.assert_close(converted(fmap).to_dense(), expected)


def _linear_attention_fp64(layer: LiteMLA, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """timm's ``LiteMLA._attn`` without its cast to fp32 (timm runs this part in fp32 even in an fp64 model)."""
    out = q @ (k.transpose(-1, -2) @ v)
    return out[..., :-1] / (out[..., -1:] + layer.eps)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_linear_attention_with_every_site_visible_is_timms_layer(backend, monkeypatch):
    """Against timm's own forward: to fp32's precision as timm computes its attention (``.float()``), and to
    fp64's once timm's attention runs in double too."""
    layer = randomized(LiteMLA(8, 8, dim=4, scales=(3, 5))).double()
    mask, x = ActiveMask.full(2, (2, 2)), torch.randn(2, 8, 16, 16, dtype=torch.float64)
    converted = ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(layer)))
    fmap = _feature_map(backend, x, mask)
    ours = converted(fmap).to_dense()
    torch.testing.assert_close(ours, layer(x), rtol=1e-5, atol=1e-5 * float(ours.detach().abs().max()))
    monkeypatch.setattr(LiteMLA, "_attn", _linear_attention_fp64)
    torch.testing.assert_close(ours, layer(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_linear_attention_attends_over_each_images_active_sites(backend):
    """EfficientViT's LiteMLA, as timm computes it on the dense masked map with every conv's output times
    the mask (SparK): keys are ReLU of convs, 0 at masked sites, so each image attends over its active ones."""
    mask = _mask()
    layer = randomized(LiteMLA(8, 8, dim=4, norm_layer=(None, None), scales=(3,))).double()
    x, site = _input(mask), mask.dense_at(4).double()
    qkv = layer.qkv(x) * site
    multi_scale = torch.cat([qkv] + [op[1](op[0](qkv) * site) * site for op in layer.aggreg], dim=1)
    b, _, h, w = x.shape
    q, k, v = multi_scale.reshape(b, -1, 12, h * w).transpose(-1, -2).chunk(3, dim=-1)
    out = _linear_attention_fp64(layer, F.relu(q), F.relu(k), F.pad(v, (0, 1), value=1.0))
    expected = layer.proj(out.transpose(-1, -2).reshape(b, -1, h, w)) * site
    converted = ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(layer)))
    fmap = _feature_map(backend, x, mask)
    torch.testing.assert_close(converted(fmap).to_dense(), expected)


def _dense_masked_additive_attention(layer: EfficientAdditiveAttention, x: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
    """SwiftFormer's attention as timm computes it, with every Linear's output times the mask (SparK)."""
    b, c, h, w = x.shape
    tokens, token_site = x.flatten(2).transpose(1, 2), site.flatten(2).transpose(1, 2)           # (B, L, C), (B, L, 1)
    query = F.normalize(layer.to_query(tokens) * token_site, dim=-1)
    key = F.normalize(layer.to_key(tokens) * token_site, dim=-1)
    attn = F.normalize(query @ layer.w_g * layer.scale_factor, dim=1)                           # over the tokens
    context = (attn * query).sum(dim=1, keepdim=True)
    out = (layer.proj(context * key) * token_site + query)
    return (layer.final(out) * token_site).transpose(1, 2).reshape(b, -1, h, w)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_additive_attention_takes_one_query_vector_per_image_over_its_active_tokens(backend):
    """SwiftFormer's additive attention written out on the dense masked map: masked tokens' queries and keys
    are 0, so the norm over tokens and the global query vector come from each image's active tokens."""
    mask = _mask()
    layer = randomized(EfficientAdditiveAttention(8, 8)).double()
    x, site = _input(mask), mask.dense_at(4).double()
    expected = _dense_masked_additive_attention(layer, x, site)
    converted = ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(layer)))
    fmap = _feature_map(backend, x, mask)
    torch.testing.assert_close(converted(fmap).to_dense(), expected)
    with_masked_tokens = layer(x)                     # timm's own layer lets masked tokens into the norm and sum
    assert not torch.allclose(with_masked_tokens * site, expected)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_additive_attention_with_every_site_visible_is_timms_layer(backend):
    layer = randomized(EfficientAdditiveAttention(8, 8)).double()
    mask, x = ActiveMask.full(2, (2, 2)), torch.randn(2, 8, 16, 16, dtype=torch.float64)
    converted = ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(layer)))
    fmap = _feature_map(backend, x, mask)
    torch.testing.assert_close(converted(fmap).to_dense(), layer(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["masked", "torch", "sparse"])
@pytest.mark.parametrize("make", [
    lambda: MetaFormerAttention(dim=8, head_dim=4),
    lambda: Attention(8, num_heads=2, qkv_bias=True, qk_norm=True, scale_norm=True, gated=True,
                      norm_layer=nn.LayerNorm),
], ids=["caformer", "timm_qk_norm_scale_norm_gated"])
def test_token_attention_is_timms_attention_over_each_images_active_tokens_alone(backend, make):
    """Images with 1, 3 and 4 (all) of their 4 patches visible: at each image's active tokens (row-major), the
    output is timm's Attention run on the sequence of those tokens alone (as if the masked patches did not
    exist; the packed rows of the sparse backends pad the shorter images), and 0 at masked sites. timm's layer
    on the whole masked map differs: its masked tokens enter every softmax as keys. CAFormer's layer, and
    ``timm.layers.Attention`` (MobileViT's) with its per-head qk-norm, scale norm and output gate."""
    active = torch.zeros(3, 1, 2, 2, dtype=torch.bool)
    active[0, 0, 1, 0] = True
    active[1, 0, 0, :] = active[1, 0, 1, 1] = True
    active[2] = True
    mask = ActiveMask(active)
    attention = randomized(make()).double()
    x = _input(mask, stride=16)                                                 # 4x4 tokens per image
    converted = ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(attention)))
    fmap = _feature_map(backend, x, mask, 16)
    out = converted(ChannelsLastView(fmap)).channels_first.to_dense()
    site = mask.dense_at(16)
    assert torch.all(out * ~site == 0)
    for image in range(3):
        tokens = _active_values(x, mask, image, stride=16)                       # [n, C], row-major
        expected = attention(tokens.unsqueeze(0))[0]
        torch.testing.assert_close(_active_values(out, mask, image, stride=16), expected, rtol=1e-12, atol=1e-12)
    whole_map = attention(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(x.shape)
    assert not torch.allclose(whole_map[0] * site[0], out[0])


def _pointwise(conv: nn.Conv2d) -> torch.Tensor:
    """``[C_in, C_out]``: a bias-free 1x1 conv as the matrix that right-multiplies ``[n, C_in]`` tokens."""
    return conv.weight[:, :, 0, 0].T


@pytest.mark.parametrize("backend", ["masked", "torch", "sparse"])
def test_multi_query_attention_shares_one_key_and_value_per_active_token_among_the_heads(backend):
    """MobileNet-V4's multi-query attention written out per image on its active tokens: per-head queries
    (channel ``head * key_dim + d``), one key and one value per active token shared by the heads, softmax
    among the image's active tokens, heads concatenated, the output 1x1 conv; 0 at masked sites."""
    mask = _mask()                                                  # 4 and 2 visible patches: padded rows
    layer = randomized(MultiQueryAttention2d(8, num_heads=2, key_dim=4, value_dim=4)).double()
    x = _input(mask)
    converted = ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(layer)))
    fmap = _feature_map(backend, x, mask)
    out = converted(fmap).to_dense()
    assert torch.all(out * ~mask.dense_at(4) == 0)
    for image in range(2):
        tokens = _active_values(x, mask, image)                                     # [n, 8]
        query = (tokens @ _pointwise(layer.query.proj)).view(-1, 2, 4).transpose(0, 1)   # [heads, n, 4]
        key, value = tokens @ _pointwise(layer.key.proj), tokens @ _pointwise(layer.value.proj)
        attended = torch.softmax(query @ key.T * layer.scale, dim=-1) @ value             # [heads, n, 4]
        expected = attended.transpose(0, 1).reshape(-1, 8) @ _pointwise(layer.output.proj)
        torch.testing.assert_close(_active_values(out, mask, image), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(layer(x) * mask.dense_at(4), out)        # timm's: masked tokens are keys too


MOBILEVIT_BLOCKS = {
    "v1": lambda: MobileVitBlock(8, 8, transformer_dim=8, transformer_depth=1, patch_size=2, num_heads=2),
    "v2": lambda: MobileVitV2Block(8, 8, transformer_dim=8, transformer_depth=2, patch_size=2),
}


@pytest.mark.parametrize("backend", ["masked", "torch", "sparse"])
@pytest.mark.parametrize("version", list(MOBILEVIT_BLOCKS))
def test_mobilevit_block_with_every_site_visible_is_timms_block(backend, version):
    """Unfolding into patch positions (one sequence per image and position, timm's order), the transformer on
    them and the fold back give timm's block where nothing is masked (V2: the transformer on the map, only its
    attention on the patch positions)."""
    block = scaled(randomized(MOBILEVIT_BLOCKS[version]()), 0.5).double()
    mask, x = ActiveMask.full(2, (1, 2)), torch.randn(2, 8, 4, 8, dtype=torch.float64)       # stride 8
    converted = ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(block)))
    fmap = _feature_map(backend, x, mask, 8)
    torch.testing.assert_close(converted(fmap).to_dense(), block(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["masked", "torch", "sparse"])
def test_mobilevit_v2_attention_takes_each_patch_positions_context_over_its_active_tokens(backend):
    """Separable self-attention written out per image and 2x2 patch position (dy, dx): the context scores are a
    softmax over that sequence's ACTIVE tokens; timm's layer on the masked map would count masked tokens too."""
    mask = _mask()
    attention = randomized(LinearSelfAttention(8)).double()
    x = _input(mask)
    converted = ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(attention)))
    converted[0].patch_size = (2, 2)                          # as the enclosing MobileVitV2Block sets it
    out = converted(_feature_map(backend, x, mask)).to_dense()
    site = mask.dense_at(4)[:, 0]
    assert torch.all(out * ~site[:, None] == 0)
    qkv = attention.qkv_proj(x)
    query, key, value = qkv[:, :1], qkv[:, 1:9], qkv[:, 9:]
    expected = torch.zeros_like(x)
    for image in range(2):
        for dy in range(2):
            for dx in range(2):
                tokens = torch.zeros_like(site[image])
                tokens[dy::2, dx::2] = site[image, dy::2, dx::2]
                scores = torch.softmax(query[image, 0][tokens], dim=0)                        # [n]
                context = (key[image][:, tokens] * scores).sum(1, keepdim=True)               # [C, 1]
                expected[image][:, tokens] = F.relu(value[image][:, tokens]) * context
    expected = attention.out_proj(expected) * site[:, None]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    unfolded = x.view(2, 8, 12, 2, 12, 2).permute(0, 1, 3, 5, 2, 4).reshape(2, 8, 4, 144)        # timm's unfold
    timms = attention(unfolded).view(2, 8, 2, 2, 12, 12).permute(0, 1, 4, 2, 5, 3).reshape(2, 8, 24, 24)
    assert not torch.allclose(timms * site[:, None], out)       # timm's: masked tokens share the softmax


def test_mobilevit_v2_attention_outside_its_block_is_refused():
    converted = ss.create_backend("masked").convert(nn.Sequential(LinearSelfAttention(8).double()))
    mask = _mask()
    with pytest.raises(UnsupportedFeatureOperation, match=r"only inside a MobileVitV2Block"):
        converted(_feature_map("masked", _input(mask), mask))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name", ["mobilevit_xxs", "mobilevitv2_050"])
def test_a_mobilevit_map_that_does_not_tile_by_its_patches_is_refused(backend, name):
    spark = ss.create_spark(name, backend=backend, input_size=96)                           # 3x3 at stride 32
    with pytest.raises(UnsupportedFeatureOperation, match=r"3x3 map at stride 32 does not tile by the 2x2 patches.*"
                                                          r"a multiple of 64"):
        spark(torch.randn(2, 3, 96, 96))


def _davit_block_by_hand(block: nn.Module, x: torch.Tensor, site: torch.Tensor, attend) -> torch.Tensor:
    """A DaViT block written out on the masked map (eval mode): positional convs masked after them (SparK's rule),
    LayerNorm and MLP per active site, ``attend(tokens [B, H, W, C])`` for the attention, residual adds."""
    shortcut = block.cpe1(x) * site
    y = shortcut + attend(block.norm1(shortcut.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
    y = block.cpe2(y) * site
    return y + block.mlp(block.norm2(y.permute(0, 2, 3, 1))).permute(0, 3, 1, 2) * site


@pytest.mark.parametrize("backend", ["masked", "torch", "sparse"])
def test_davit_window_attention_attends_among_each_windows_active_tokens(backend):
    """3x3 windows at stride 16 (each straddles patches): timm's own attention run on each window's ACTIVE tokens
    alone; a window without any stays 0. timm's block on the masked map would let masked tokens attend too."""
    mask = _mask()
    block = scaled(randomized(DavitSpatialBlock(8, num_heads=2, window_size=3)), 0.5).double().eval()
    x, site = _input(mask, stride=16), mask.dense_at(16)

    def attend(tokens: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(tokens)
        for image in range(2):
            for wy in range(2):
                for wx in range(2):
                    window = (image, slice(3 * wy, 3 * wy + 3), slice(3 * wx, 3 * wx + 3))
                    active = site[image, 0][window[1:]]
                    if active.any():
                        out[window][active] = block.attn(tokens[window][active][None])[0]
        return out

    converted = ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(block))).eval()
    out = converted(_feature_map(backend, x, mask, 16)).to_dense()
    torch.testing.assert_close(out, _davit_block_by_hand(block, x, site, attend), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(block(x) * site, out)


@pytest.mark.parametrize("backend", ["masked", "torch", "sparse"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_davit_channel_attention_sums_over_each_images_active_tokens(backend, v2):
    """timm's channel attention run on each image's ACTIVE tokens alone (V2: scaled by their number)."""
    mask = _mask()
    block = scaled(randomized(DavitChannelBlock(8, num_heads=2, qkv_bias=True, v2=v2)), 0.5).double().eval()
    x, site = _input(mask), mask.dense_at(4)

    def attend(tokens: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(tokens)
        for image in range(2):
            active = site[image, 0]
            out[image][active] = block.attn(tokens[image][active][None])[0]
        return out

    converted = ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(block))).eval()
    out = converted(_feature_map(backend, x, mask)).to_dense()
    torch.testing.assert_close(out, _davit_block_by_hand(block, x, site, attend), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(block(x) * site, out)


@pytest.mark.parametrize("backend", ["masked", "torch", "sparse"])
@pytest.mark.parametrize("kind", ["spatial", "channel", "channel_v2"])
def test_davit_blocks_with_every_site_visible_are_timms(backend, kind):
    block = {"spatial": lambda: DavitSpatialBlock(8, num_heads=2, window_size=7),
             "channel": lambda: DavitChannelBlock(8, num_heads=2, qkv_bias=True),
             "channel_v2": lambda: DavitChannelBlock(8, num_heads=2, qkv_bias=True, v2=True)}[kind]()
    block = scaled(randomized(block), 0.5).double()
    mask, x = ActiveMask.full(2, (7, 14)), torch.randn(2, 8, 14, 28, dtype=torch.float64)    # stride 16: 2x4 windows
    converted = ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(block)))
    torch.testing.assert_close(converted(_feature_map(backend, x, mask, 16)).to_dense(), block(x),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_davit_map_that_its_windows_do_not_tile_is_refused(backend):
    spark = ss.create_spark("davit_tiny", backend=backend, input_size=64, depths=(1, 1, 1, 1),
                            embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8))
    with pytest.raises(UnsupportedFeatureOperation, match=r"16x16 map at stride 4 does not tile by the 7x7 windows.*"
                                                          r"a multiple of 224"):
        spark(torch.randn(2, 3, 64, 64))


def _efficientformer_attention_by_hand(layer: EfficientFormerAttention, tokens: torch.Tensor,
                                       positions: torch.Tensor) -> torch.Tensor:
    """EfficientFormer's attention written out for one image's tokens ``[n, C]`` at grid ``positions`` ``[n]``:
    per head ``softmax(q k^T * scale + bias of each pair's positions) v``, heads concatenated, projected."""
    heads, key_dim, val_dim = layer.num_heads, layer.key_dim, layer.val_dim
    q, k, v = layer.qkv(tokens).view(len(tokens), heads, -1).split([key_dim, key_dim, val_dim], dim=-1)
    biases = layer.attention_biases[:, layer.attention_bias_idxs[positions][:, positions]]      # [heads, n, n]
    outs = [((q[:, h] @ k[:, h].T) * layer.scale + biases[h]).softmax(-1) @ v[:, h] for h in range(heads)]
    return layer.proj(torch.cat(outs, dim=-1))


@pytest.mark.parametrize("backend", ["masked", "torch", "sparse"])
def test_efficientformer_attention_attends_among_active_tokens_with_the_bias_of_their_grid_positions(backend):
    """Images of 3x3 patches, 4 and 2 visible, at stride 32 (a 3x3 token grid, biases built for it): at each
    image's active tokens the output is the attention among those tokens alone, each pair keeping the learnt
    bias of its positions on the grid (not of its order among the active tokens); 0 at masked sites. timm's
    layer on the whole masked map differs (its masked tokens are keys)."""
    mask = _mask()
    layer = randomized(EfficientFormerAttention(8, key_dim=4, num_heads=2, attn_ratio=2, resolution=3)).double()
    x = _input(mask, stride=32)
    converted = ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(layer)))
    out = converted(ChannelsLastView(_feature_map(backend, x, mask, 32))).channels_first.to_dense()
    site = mask.dense_at(32)
    assert torch.all(out * ~site == 0)
    for image in range(2):
        positions = site[image, 0].flatten().nonzero()[:, 0]                     # row-major, as the rows
        expected = _efficientformer_attention_by_hand(layer, _active_values(x, mask, image, stride=32), positions)
        torch.testing.assert_close(_active_values(out, mask, image, stride=32), expected, rtol=1e-12, atol=1e-12)
        by_rank = _efficientformer_attention_by_hand(layer, _active_values(x, mask, image, stride=32),
                                                     torch.arange(len(positions)))
        assert not torch.allclose(by_rank, expected)
    whole_map = layer(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(x.shape)
    assert not torch.allclose(whole_map[0] * site[0], out[0])


@pytest.mark.parametrize("backend", ["masked", "torch", "sparse"])
def test_efficientformer_attention_with_every_site_visible_is_timms_layer(backend):
    layer = randomized(EfficientFormerAttention(8, key_dim=4, num_heads=2, attn_ratio=2, resolution=3)).double()
    mask, x = ActiveMask.full(2, (3, 3)), torch.randn(2, 8, 3, 3, dtype=torch.float64)
    converted = ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(layer)))
    out = converted(ChannelsLastView(_feature_map(backend, x, mask, 32))).channels_first.to_dense()
    expected = layer(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_an_efficientformer_at_another_input_size_than_its_attention_biases_is_refused(backend):
    """The biases exist for the 7x7 grid of a 224 px image: a 256 px encoder is refused at its first forward,
    naming the size that works; on a map (not the token sequence) the attention is refused too."""
    spark = ss.create_spark("efficientformer_l1", backend=backend, input_size=256, depths=(1, 1, 1, 2),
                            embed_dims=(16, 32, 64, 128))
    with pytest.raises(UnsupportedFeatureOperation, match=r"learnt for a 7x7 token grid, got a 8x8 map at stride 32; "
                                                          r"use input size 224"):
        spark(torch.randn(2, 3, 256, 256))
    layer = EfficientFormerAttention(8, key_dim=4, num_heads=2, attn_ratio=2, resolution=3).double()
    converted = ss.create_backend(backend).convert(nn.Sequential(layer))
    mask = _mask()
    with pytest.raises(UnsupportedFeatureOperation, match=r"takes the token sequence \(a channels-last view\)"):
        converted(_feature_map(backend, _input(mask, stride=32), mask, 32))


@pytest.mark.parametrize("backend", ["masked", "torch", "sparse"])
def test_pvt_v2_attention_attends_among_the_keys_of_each_images_active_patches(backend):
    """Images of 3x3 patches (4 and 2 visible), tokens at stride 16: keys and values come from the stride-2
    conv's map, the patch grid, at each image's active patches alone (conv, LayerNorm, ``kv``); each active
    token's output is the attention over them, 0 at masked sites. timm's layer on the whole masked map differs:
    its masked patches are keys too (the conv's and LayerNorm's biases)."""
    mask = _mask()
    layer = randomized(PvtAttention(8, num_heads=2, sr_ratio=2)).double()
    x = _input(mask, stride=16)                                                 # 6x6 tokens per image
    converted = ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(layer)))
    out = converted(ChannelsLastView(_feature_map(backend, x, mask, 16))).channels_first.to_dense()
    assert torch.all(out * ~mask.dense_at(16) == 0)
    reduced = layer.sr(x)                                                       # [B, C, 3, 3]: one site per patch
    heads, head_dim = layer.num_heads, layer.head_dim
    for image in range(2):
        tokens = _active_values(x, mask, image, stride=16)
        keys = layer.norm(_active_values(reduced, mask, image, stride=32))      # the image's active patches alone
        q = layer.q(tokens).view(-1, heads, head_dim).transpose(0, 1)
        k, v = layer.kv(keys).view(-1, 2, heads, head_dim).permute(1, 2, 0, 3)
        attended = ((q @ k.transpose(-1, -2)) * layer.scale).softmax(-1) @ v  # [heads, n, d]
        expected = layer.proj(attended.transpose(0, 1).reshape(len(tokens), -1))
        torch.testing.assert_close(_active_values(out, mask, image, stride=16), expected, rtol=1e-12, atol=1e-12)
    whole_map = layer(x.flatten(2).transpose(1, 2), (6, 6)).transpose(1, 2).reshape(x.shape)
    assert not torch.allclose(whole_map[0] * mask.dense_at(16)[0], out[0])


@pytest.mark.parametrize("backend", ["masked", "torch", "sparse"])
@pytest.mark.parametrize("sr_ratio", [2, 1])
def test_pvt_v2_stage_with_every_site_visible_is_timms(backend, sr_ratio):
    stage = scaled(randomized(PyramidVisionTransformerStage(8, 8, depth=2, num_heads=2, sr_ratio=sr_ratio,
                                                            mlp_ratio=2.0)), 0.5).double()
    mask, x = ActiveMask.full(2, (2, 3)), torch.randn(2, 8, 8, 12, dtype=torch.float64)       # stride 8 -> 16
    converted = ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(stage)))
    torch.testing.assert_close(converted(_feature_map(backend, x, mask, 8)).to_dense(), stage(x),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_pvt_v2_layers_given_a_map_instead_of_tokens_are_refused(backend):
    converted = ss.create_backend(backend).convert(nn.Sequential(PvtAttention(8, num_heads=2, sr_ratio=2).double()))
    mask = _mask()
    with pytest.raises(UnsupportedFeatureOperation, match=r"takes the token sequence \(a channels-last view\)"):
        converted(_feature_map(backend, _input(mask, stride=16), mask, 16))


@pytest.mark.parametrize("backend", ["masked", "torch", "sparse"])
def test_twins_window_attention_attends_among_each_windows_active_tokens(backend):
    """Twins-SVT's locally grouped attention with 3x3 windows on a 6x6 map (4 windows per image; images of 3x3
    patches at stride 16): each active token's output is softmax attention among the active tokens of its own
    window alone (a window without any has none), 0 at masked sites."""
    mask = _mask()
    layer = randomized(LocallyGroupedAttn(8, num_heads=2, ws=3)).double()
    x = _input(mask, stride=16)
    converted = ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(layer)))
    out = converted(ChannelsLastView(_feature_map(backend, x, mask, 16))).channels_first.to_dense()
    site = mask.dense_at(16)[:, 0]
    assert torch.all(out * ~site.unsqueeze(1) == 0)
    heads, head_dim = layer.num_heads, layer.dim // layer.num_heads
    for image in range(2):
        for wy in range(2):
            for wx in range(2):
                window = (slice(3 * wy, 3 * wy + 3), slice(3 * wx, 3 * wx + 3))
                active = site[image][window]
                if not active.any():
                    continue
                tokens = x[image][(slice(None), *window)].permute(1, 2, 0)[active]          # [n, C], row-major
                q, k, v = layer.qkv(tokens).view(-1, 3, heads, head_dim).permute(1, 2, 0, 3)
                attended = ((q @ k.transpose(-1, -2)) * layer.scale).softmax(-1) @ v
                expected = layer.proj(attended.transpose(0, 1).reshape(len(tokens), -1))
                got = out[image][(slice(None), *window)].permute(1, 2, 0)[active]
                torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["masked", "torch", "sparse"])
@pytest.mark.parametrize("ws", [7, 1], ids=["window", "global"])
def test_twins_block_and_positional_conv_with_every_site_visible_are_timms(backend, ws):
    block = scaled(randomized(TwinsBlock(8, num_heads=2, mlp_ratio=2.0, sr_ratio=2, ws=ws)), 0.5).double()
    pos_conv = randomized(TwinsPosConv(8, 8)).double()
    mask, x = ActiveMask.full(2, (7, 14)), torch.randn(2, 8, 14, 28, dtype=torch.float64)    # stride 16: 2x4 windows
    size = (14, 28)
    expected = pos_conv(block(x.flatten(2).transpose(1, 2), size), size).transpose(1, 2).reshape(x.shape)
    backend_obj = ss.create_backend(backend)
    block_c = backend_obj.convert(nn.Sequential(copy.deepcopy(block)))[0]
    pos_c = backend_obj.convert(nn.Sequential(copy.deepcopy(pos_conv)))[0]
    tokens = ChannelsLastView(_feature_map(backend, x, mask, 16))
    out = pos_c(block_c(tokens, size), size).channels_first.to_dense()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_twins_svt_map_that_its_windows_do_not_tile_is_refused(backend):
    spark = ss.create_spark("twins_svt_small", backend=backend, input_size=64, depths=(2, 2, 2, 2),
                            embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8))
    with pytest.raises(UnsupportedFeatureOperation, match=r"16x16 map at stride 4 does not tile by the 7x7 windows.*"
                                                          r"a multiple of 224"):
        spark(torch.randn(2, 3, 64, 64))


def _swin_window_attention_by_hand(attn: nn.Module, tokens: torch.Tensor, site: torch.Tensor, window: int,
                                   shift: int) -> torch.Tensor:
    """Swin's (shifted) window attention written out on the masked tokens ``[B, H, W, C]`` (``site`` ``[B, H, W]``):
    :func:`_window_attention_by_hand` with logits ``q k^T * scale`` and the learnt table of relative position biases."""
    return _window_attention_by_hand(attn, tokens, site, window, shift, qkv=attn.qkv,
                                     logits=lambda q, k: q @ k.transpose(-1, -2) * attn.scale,
                                     position_table=attn.relative_position_bias_table)


def _swinv2_window_attention_by_hand(attn: nn.Module, tokens: torch.Tensor, site: torch.Tensor, window: int,
                                     shift: int) -> torch.Tensor:
    """Swin-V2's: :func:`_window_attention_by_hand` with cosine logits ``normalize(q) normalize(k)^T * exp(min(
    logit_scale, log 100))`` per head, queries and values biased (``cat(q_bias, 0, v_bias)``, keys not) and the
    continuous position biases ``16 * sigmoid(cpb_mlp(relative_coords_table))``."""
    def cosine_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        scale = attn.logit_scale.clamp(max=math.log(100.0)).exp()                           # [heads, 1, 1]
        return F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2) * scale

    bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    table = 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads))
    return _window_attention_by_hand(attn, tokens, site, window, shift, qkv=lambda x: F.linear(x, attn.qkv.weight, bias),
                                     logits=cosine_logits, position_table=table)


def _window_attention_by_hand(attn: nn.Module, tokens: torch.Tensor, site: torch.Tensor, window: int, shift: int,
                              qkv: Callable, logits: Callable, position_table: torch.Tensor) -> torch.Tensor:
    """(Shifted) window attention on the masked tokens ``[B, H, W, C]`` (``site`` ``[B, H, W]``): the map rolled by
    ``-shift``, then per window and head, among the window's ACTIVE tokens alone, ``softmax(logits(q, k) +
    position_table[(dy + ws - 1) * (2 ws - 1) + dx + ws - 1] - 100 [the pair's regions differ]) v``, ``(dy, dx)``
    the pair's offset in the window and a site's region its band of rows and of columns of the rolled map (before
    the last ``ws``, the ``ws - shift`` after, the last ``shift``), heads concatenated and projected; rolled back."""
    batch, height, width, _ = tokens.shape
    rolled, rolled_site = tokens.roll((-shift, -shift), (1, 2)), site.roll((-shift, -shift), (1, 2))
    heads = attn.num_heads
    head_dim = attn.qkv.out_features // (3 * heads)

    def band(position: int, size: int) -> int:
        return 0 if position < size - window else 1 if position < size - shift else 2

    out = torch.zeros_like(rolled)
    for image in range(batch):
        for top in range(0, height, window):
            for left in range(0, width, window):
                cells = [(y, x) for y in range(top, top + window) for x in range(left, left + window)
                         if rolled_site[image, y, x]]
                if not cells:
                    continue
                q, k, v = qkv(torch.stack([rolled[image, y, x] for y, x in cells])).view(
                    len(cells), 3, heads, head_dim).permute(1, 2, 0, 3)                       # [heads, n, d] each
                bias = torch.stack([torch.stack([
                    position_table[(yi - yj + window - 1) * (2 * window - 1) + xi - xj + window - 1]
                    - 100.0 * ((band(yi, height), band(xi, width)) != (band(yj, height), band(xj, width)) and shift > 0)
                    for yj, xj in cells]) for yi, xi in cells]).permute(2, 0, 1)             # [heads, n, n]
                attended = (logits(q, k) + bias).softmax(-1) @ v
                projected = attn.proj(attended.transpose(0, 1).reshape(len(cells), -1))
                for (y, x), value in zip(cells, projected):
                    out[image, y, x] = value
    return out.roll((shift, shift), (1, 2))


@pytest.mark.parametrize("backend", ["masked", "torch", "sparse"])
@pytest.mark.parametrize("shift", [0, 1], ids=["windows", "shifted_windows"])
def test_swin_block_attends_among_each_windows_active_tokens_with_its_position_and_region_biases(backend, shift):
    """Swin's block with 3x3 windows on a 6x6 map (stride 16, images of 3x3 patches: each window straddles
    patches), unshifted and shifted by 1 (a window of the rolled map then holds active tokens of two regions):
    LayerNorm and MLP per active site, the attention of :func:`_swin_window_attention_by_hand`, residual adds;
    masked sites stay 0. timm's block on the masked map would let masked tokens attend too."""
    mask = _mask()
    block = scaled(randomized(SwinTransformerBlock(8, input_resolution=(6, 6), num_heads=2, window_size=3,
                                                   shift_size=shift, mlp_ratio=2.0)), 0.5).double().eval()
    x, site = _input(mask, stride=16).permute(0, 2, 3, 1), mask.dense_at(16)[:, 0]
    y = x + _swin_window_attention_by_hand(block.attn, block.norm1(x), site, window=3, shift=shift)
    expected = y + block.mlp(block.norm2(y)) * site.unsqueeze(-1)
    converted = ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(block))).eval()
    out = converted(ChannelsLastView(_feature_map(backend, x.permute(0, 3, 1, 2), mask, 16))).permute(0, 3, 1, 2)
    torch.testing.assert_close(out.to_dense().permute(0, 2, 3, 1), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(block(x) * site.unsqueeze(-1), expected)


def with_a_logit_scale_above_its_clamp(module: nn.Module) -> nn.Module:
    """``module`` with the first head of each Swin-V2 window attention at logit scale 5 (timm clamps it at
    ``log 100``, 4.6, so the clamp counts); no change to other modules."""
    with torch.no_grad():
        for attention in module.modules():
            if isinstance(attention, SwinV2WindowAttention):
                attention.logit_scale[0] = 5.0
    return module


@pytest.mark.parametrize("backend", ["masked", "torch", "sparse"])
@pytest.mark.parametrize("shift", [0, 1], ids=["windows", "shifted_windows"])
def test_swinv2_block_attends_among_each_windows_active_tokens_with_cosine_logits_and_continuous_position_biases(
        backend, shift):
    """Swin-V2's block as V1's test above (3x3 windows on a 6x6 map, unshifted and shifted by 1), its maths V2's:
    the attention of :func:`_swinv2_window_attention_by_hand` (one head's logit scale above timm's clamp), and
    residual post-norms ``x + norm1(attention(x))``, ``y + norm2(mlp(y))`` per active site; masked sites stay 0."""
    mask = _mask()
    block = SwinTransformerV2Block(8, input_resolution=(6, 6), num_heads=2, window_size=3, shift_size=shift,
                                   mlp_ratio=2.0)
    block = with_a_logit_scale_above_its_clamp(scaled(randomized(block), 0.5)).double().eval()
    x, site = _input(mask, stride=16).permute(0, 2, 3, 1), mask.dense_at(16)[:, 0]
    y = x + block.norm1(_swinv2_window_attention_by_hand(block.attn, x, site, window=3, shift=shift)) * site.unsqueeze(-1)
    expected = y + block.norm2(block.mlp(y)) * site.unsqueeze(-1)
    converted = ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(block))).eval()
    out = converted(ChannelsLastView(_feature_map(backend, x.permute(0, 3, 1, 2), mask, 16))).permute(0, 3, 1, 2)
    torch.testing.assert_close(out.to_dense().permute(0, 2, 3, 1), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(block(x) * site.unsqueeze(-1), expected)


@pytest.mark.parametrize("backend", ["masked", "torch", "sparse"])
@pytest.mark.parametrize("options,shift", [({}, (0, 3)), (dict(dynamic_mask=True), (0, 3)),
                                           (dict(always_partition=True), (3, 3))],
                         ids=["strict", "dynamic_mask", "always_partition"])
@pytest.mark.parametrize("stage_class", [SwinTransformerStage, SwinTransformerV2Stage], ids=["swin", "swinv2"])
def test_swin_stage_with_every_site_visible_is_timms(backend, options, shift, stage_class):
    """Swin's (and Swin-V2's) stage at stride 16 of a 224x448 image: patch merging to the 7x14 map at stride 32, a
    block of 7x7 windows and one of shifted windows. timm shifts only along the width (the height is one window),
    unless ``always_partition``; with ``dynamic_mask`` its region mask is built at each forward instead of once."""
    stage = stage_class(8, 16, input_resolution=(14, 28), depth=2, num_heads=2, window_size=7, mlp_ratio=2.0,
                        downsample=True, **options)
    stage = with_a_logit_scale_above_its_clamp(scaled(randomized(stage), 0.5)).double()
    assert stage.blocks[1].shift_size == shift
    mask, x = ActiveMask.full(2, (7, 14)), torch.randn(2, 8, 14, 28, dtype=torch.float64)
    expected = stage(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    converted = ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(stage)))[0]
    out = converted(ChannelsLastView(_feature_map(backend, x, mask, 16))).permute(0, 3, 1, 2).to_dense()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


#: a narrow Swin-T (and Swin-V2-T) for the whole-model tests below (one shifted block in stages 1-3, the last one is
#: one window)
SWIN_NARROW = dict(depths=(2, 2, 2, 2), embed_dim=16, num_heads=(1, 2, 4, 8))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name,size,refusal", [
    ("swin_tiny_patch4_window7_224", 64, r"16x16 map at stride 4 does not tile by the 7x7 windows.*a multiple of 224"),
    # 8x8 windows: the 24x24 map at stride 4 tiles, the 12x12 one at stride 8 does not (timm would pad it)
    ("swinv2_tiny_window8_256", 96, r"12x12 map at stride 8 does not tile by the 8x8 windows.*a multiple of 256")],
    ids=["swin", "swinv2"])
def test_a_swin_map_that_its_windows_do_not_tile_is_refused(backend, name, size, refusal):
    spark = ss.create_spark(name, backend=backend, input_size=size, img_size=size, **SWIN_NARROW)
    with pytest.raises(UnsupportedFeatureOperation, match=refusal):
        spark(torch.randn(2, 3, size, size))


def test_a_strict_swin_at_another_size_than_its_img_size_is_refused_naming_the_fix():
    spark = ss.create_spark("swin_tiny_patch4_window7_224", backend="sparse", input_size=448, **SWIN_NARROW)
    with pytest.raises(UnsupportedFeatureOperation, match=r"built for 224x224 images \(timm's strict_img_size\), got "
                                                          r"448x448; use that input size \(--input_size 224\), or "
                                                          r"build the model for yours \(--model_kwargs img_size=448; "
                                                          r"Python: ss.create_spark\(name, input_size=448, "
                                                          r"img_size=448\)\)"):
        spark(torch.randn(1, 3, 448, 448))


@pytest.mark.parametrize("name, timm_class, own_size", [
    ("swin_tiny_patch4_window7_224", SwinTransformer, 224),
    ("swinv2_tiny_window8_256", SwinTransformerV2, 256)], ids=["swin", "swinv2"])
def test_a_dynamic_size_swin_at_twice_its_size_with_every_site_visible_is_timms(name, timm_class, own_size):
    """``strict_img_size=False`` at twice the model's size: every block keeps the window and shift timm chose at
    its own size (the last stage's map, then the size of a window, unshifted) and its region masks are built for
    the maps at hand, as timm's (V2's blocks: ``dynamic_mask``)."""
    torch.manual_seed(0)
    size, window = 2 * own_size, {224: 7, 256: 8}[own_size]
    spark = ss.create_spark(name, backend="sparse", input_size=size, strict_img_size=False,
                            **SWIN_NARROW).double().eval()
    dense = timm_class(num_classes=0, img_size=own_size, window_size=window, strict_img_size=False,
                       **SWIN_NARROW).double().eval()
    dense.load_state_dict(spark.encoder_state_dict())
    images = torch.randn(1, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        ours = [f.to_dense() for f in spark.encode(images, ActiveMask.full(1, (size // 32, size // 32)))]
        theirs = dense.forward_intermediates(images, indices=spark.encoder.feature_indices, norm=True,
                                             intermediates_only=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["masked", "torch", "sparse"])
def test_condconv_block_routes_each_image_by_the_mean_of_its_active_sites(backend):
    """CondConv's block in eval mode written out with timm's own layers: routing weights from each image's mean
    over its ACTIVE sites (timm's adaptive average pool would count the masked zeros), each routed conv and
    BatchNorm masked after it (SparK's rule), the shortcut added."""
    mask = _mask()
    block = randomized(CondConvResidual(8, 8, exp_ratio=2.0, num_experts=3)).double().eval()
    x, site = _input(mask), mask.dense_at(4)
    means = x.sum((2, 3)) / site.sum((2, 3))
    routing = torch.sigmoid(block.routing_fn(means))
    y = block.bn1(block.conv_pw(x, routing)) * site
    y = block.bn2(block.conv_dw(y, routing)) * site
    expected = block.bn3(block.conv_pwl(y, routing)) * site + x
    converted = ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(block))).eval()
    fmap = _feature_map(backend, x, mask)
    torch.testing.assert_close(converted(fmap).to_dense(), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(block(x) * site, expected)             # timm's pool counts masked zeros


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_edgenext_block_encodes_positions_and_attends_across_channels_over_active_tokens(backend):
    """EdgeNeXt's split-transpose block written out on the dense masked map: every conv and Linear output
    times the mask (SparK), the positional encoding added at active sites only, XCA's L2 norms and
    channel-by-channel sums over each image's active tokens."""
    mask = _mask()
    layer = randomized(SplitTransposeBlock(8, num_scales=2, num_heads=2)).double()
    x, site = _input(mask), mask.dense_at(4).double()
    b, c, h, w = x.shape
    first, rest = x.chunk(2, dim=1)
    y = torch.cat([layer.convs[0](first) * site, rest], dim=1) + layer.pos_embd((b, h, w)) * site
    tokens, token_site = y.flatten(2).transpose(1, 2), site.flatten(2).transpose(1, 2)        # (B, L, C), (B, L, 1)
    xca = layer.xca
    qkv = (xca.qkv(layer.norm_xca(tokens)) * token_site).reshape(b, h * w, 3, 2, 4).permute(2, 0, 3, 4, 1)
    q, k, v = qkv.unbind(0)                                                                    # (B, heads, c, L)
    attn = ((F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * xca.temperature).softmax(-1)
    attended = xca.proj((attn @ v).permute(0, 3, 1, 2).reshape(b, h * w, c)) * token_site
    tokens = tokens + layer.gamma_xca * attended
    branch = layer.gamma * (layer.mlp(layer.norm(tokens)) * token_site)
    expected = x + branch.transpose(1, 2).reshape(b, c, h, w)
    converted = ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(layer)))
    fmap = _feature_map(backend, x, mask)
    torch.testing.assert_close(converted(fmap).to_dense(), expected)


def test_per_image_values_reach_their_rows_with_the_same_gradient_every_time():
    """Exact resume needs bit-identical gradients. On the CPU, with two threads, the backward of
    ``values[image_of_row]`` (an accumulating index_put) differed from run to run when the threads' halves
    of the rows share an image (here 389 and 400 rows: 20 different gradients in 20 runs);
    per_image gathers with index_select, whose backward does not."""
    from spark_sparse.backends.per_image import image_softmax, per_site_values
    active = torch.ones(2, 1, 20, 20, dtype=torch.bool)
    active[0, 0, 0, :11] = False
    mask = ActiveMask(active)
    rows = int(active.sum())
    x = ss.SparseRows(torch.zeros(rows, 64), mask, 32)
    values = torch.randn(2, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    upstream = torch.randn(rows, 64, generator=torch.Generator().manual_seed(1))
    logits = torch.randn(rows, 1, generator=torch.Generator().manual_seed(2), requires_grad=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gradients = set()
        for _ in range(10):
            values.grad = logits.grad = None
            ((per_site_values(x, values) * upstream).sum() + (image_softmax(x, logits) * upstream[:, :1]).sum()).backward()
            gradients.add(values.grad.numpy().tobytes() + logits.grad.numpy().tobytes())
    finally:
        torch.set_num_threads(threads)
    assert len(gradients) == 1


@pytest.mark.parametrize("layer", [nn.GroupNorm(2, 8), GroupNormAct(8, num_groups=4, act_layer=nn.SiLU)],
                         ids=["GroupNorm", "GroupNormAct"])
def test_group_norm_takes_statistics_per_image_and_group_over_active_sites(layer):
    mask, layer = _mask(), randomized(layer).double()
    x = _input(mask)
    out = _masked_run(layer, x, mask)
    act = getattr(layer, "act", nn.Identity())
    for image in range(2):
        rows = _active_values(x, mask, image)                                   # [n, C]
        groups = rows.view(rows.shape[0], layer.num_groups, -1)
        mean = groups.mean(dim=(0, 2), keepdim=True)
        var = groups.var(dim=(0, 2), unbiased=False, keepdim=True)
        want = act(((groups - mean) / torch.sqrt(var + layer.eps)).view_as(rows) * layer.weight + layer.bias)
        torch.testing.assert_close(_active_values(out, mask, image), want)
    assert torch.all(out[~mask.dense_at(4).expand_as(out)] == 0)


def test_global_response_norm_uses_each_images_l2_norm_over_active_sites():
    mask, grn = _mask(), randomized(GlobalResponseNorm(8, channels_last=False)).double()
    x = _input(mask)
    out = _masked_run(grn, x, mask)
    for image in range(2):
        rows = _active_values(x, mask, image)
        norm = rows.norm(dim=0)
        normalized = norm / (norm.mean() + grn.eps)
        want = rows + grn.bias + grn.weight * rows * normalized
        torch.testing.assert_close(_active_values(out, mask, image), want)
    assert torch.all(out[~mask.dense_at(4).expand_as(out)] == 0)


def test_global_response_norm_gradient_is_finite_when_a_channel_is_zero_in_an_image():
    mask, grn = _mask(), randomized(GlobalResponseNorm(8, channels_last=False)).double()
    x = _input(mask)
    x[0, 3] = 0.0
    x.requires_grad_(True)
    _masked_run(grn, x, mask).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("make", [
    lambda: BatchNormAct2d(8, act_layer=nn.Hardswish),
    lambda: GroupNormAct(8, num_groups=4),
    lambda: nn.GroupNorm(2, 8),
    lambda: SEModule(8, rd_channels=4),
    lambda: SqueezeExcite(8, rd_channels=4),
    lambda: EcaModule(channels=8),
    lambda: GlobalResponseNorm(8, channels_last=False),
    lambda: StdConv2d(8, 12, 3, padding=1),
    lambda: ScaledStdConv2d(8, 12, 3),
    lambda: nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
    lambda: LayerScale2d(8, init_values=0.5),
    lambda: Conv2dSame(8, 12, 3, stride=2),
    lambda: Conv2dSame(8, 8, 5, stride=2, groups=8),
    lambda: MixedConv2d(8, 12, [3, 5], stride=2, padding="same"),
    lambda: nn.Upsample(scale_factor=2, mode="nearest"),
    lambda: GammaAct("silu", gamma=1.7),
    lambda: GlobalContext(8, fuse_add=True, rd_channels=4),
    lambda: StarReLU(),
    lambda: LayerNorm2dNoBias(8),
    lambda: Pooling(3),
    lambda: GroupNorm1NoBias(8),
    lambda: FocalModulation(8, focal_window=3, focal_level=2, use_post_norm=True, normalize_modulator=True),
    lambda: SplitTransposeBlock(8, num_scales=2, num_heads=2),
    lambda: SpaceToDepth(),
], ids=["BatchNormAct2d", "GroupNormAct", "GroupNorm", "SEModule", "SqueezeExcite", "EcaModule",
        "GlobalResponseNorm", "StdConv2d", "ScaledStdConv2d", "AvgPool2d_resnet_d", "LayerScale2d",
        "Conv2dSame_3x3_s2", "Conv2dSame_depthwise_5x5_s2", "MixedConv2d_same_s2", "Upsample_nearest_x2", "GammaAct_silu",
        "GlobalContext", "StarReLU", "LayerNorm2dNoBias", "Pooling",
        "GroupNorm1NoBias", "FocalModulation", "SplitTransposeBlock", "SpaceToDepth"])
def test_with_every_site_visible_the_layer_is_timms_dense_layer(backend, make):
    layer = randomized(make()).double()
    mask = ActiveMask.full(2, (2, 2))
    x = torch.randn(2, 8, 16, 16, dtype=torch.float64)
    backend_obj = ss.create_backend(backend)
    converted = backend_obj.convert(nn.Sequential(copy.deepcopy(layer)))
    fmap = _feature_map(backend, x, mask)
    torch.testing.assert_close(converted(fmap).to_dense(), layer(x))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("upsample", [nn.Upsample(scale_factor=2, mode="bilinear"), nn.Upsample(size=(8, 8)),
                                      nn.Upsample(scale_factor=1.5), nn.Upsample(scale_factor=(2, 1))],
                         ids=["bilinear", "size", "fractional", "per_axis"])
def test_an_upsample_other_than_nearest_by_one_integer_factor_is_refused(backend, upsample):
    with pytest.raises(NotImplementedError, match=r"^1: nn\.Upsample.* only nearest upsampling by one integer factor"):
        ss.create_backend(backend).convert(nn.Sequential(nn.Conv2d(8, 8, 1), upsample))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("pool,match", [
    (BlurPool2d(8, filt_size=3, stride=2, pad_mode="replicate"), r"pad_mode='replicate'; backends reproduce"),
    (BlurPool2d(8, filt_size=2, stride=2), r"maps 14 sites to 8, not 7"),
], ids=["replicate", "even_filter"])
def test_a_blur_pool_backends_cannot_reproduce_is_refused(backend, pool, match):
    with pytest.raises(NotImplementedError, match=r"^1: .*" + match):
        ss.create_backend(backend).convert(nn.Sequential(nn.Conv2d(8, 8, 1), pool))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_space_to_depth_past_the_patch_size_is_refused(backend):
    """A stride-16 map rearranged by 4 would be a stride-64 map, each site mixing visible and masked patches."""
    mask = ActiveMask.random(2, (4, 4), 0.5, generator=torch.Generator().manual_seed(0))
    layer = ss.create_backend(backend).convert(nn.Sequential(SpaceToDepth()))
    x = torch.randn(2, 8, 8, 8) * mask.dense_at(16)
    fmap = _feature_map(backend, x, mask, 16)
    with pytest.raises(ValueError, match=r"space-to-depth to stride 64 would put visible and masked pixels in one site"):
        layer(fmap)


def test_reflect_neighbour_tables_read_the_mirrored_site_and_unknown_modes_are_refused():
    mask = ActiveMask.full(1, (1, 1))                           # one 32 px patch: an 8x8 map at stride 4
    table = mask.neighbour_table(4, 8, (3, 3), (1, 1), (1, 1), padding_mode="reflect")
    grid = mask.index_grid(4)[0]
    assert table[0].tolist() == [grid[1, 1], grid[1, 0], grid[1, 1], grid[0, 1], grid[0, 0], grid[0, 1],
                                 grid[1, 1], grid[1, 0], grid[1, 1]]      # output (0, 0): rows -1, 0, 1 -> 1, 0, 1
    with pytest.raises(ValueError, match="padding_mode 'circular'"):
        mask.neighbour_table(4, 8, (3, 3), (1, 1), (1, 1), padding_mode="circular")


def test_zero_padded_max_pool_counts_padding_as_zero_unlike_max_pool_padding():
    x = -torch.rand(1, 2, 8, 8) - 1.0                          # all negative: only padding can give 0
    padded = ConstantPadMaxPool2d(3, 2, 1)(x)
    assert torch.all(padded[..., 0, :] == 0) and torch.all(padded[..., :, 0] == 0)
    torch.testing.assert_close(padded, F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, 2))


def test_bit_stem_pad_and_pool_fold_into_one_layer_with_the_same_output():
    stem = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ConstantPad2d(1, 0.0), nn.MaxPool2d(3, 2, 0))
    x = torch.randn(2, 3, 32, 32)
    want = stem(x)
    fold_zero_pad_into_max_pool(stem)
    assert isinstance(stem[1], nn.Identity) and type(stem[2]) is ConstantPadMaxPool2d
    torch.testing.assert_close(stem(x), want)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_an_nfnet_gamma_activation_that_fills_masked_sites_is_refused(backend):
    with pytest.raises(ss.UnsupportedModuleError, match=r"'1' \(GammaAct of .*sigmoid.*\): the activation gives 0\.5 at 0"):
        ss.create_backend(backend).convert(nn.Sequential(nn.Conv2d(8, 8, 1), GammaAct("sigmoid", gamma=2.0)))


@pytest.mark.parametrize("backend", ALL_BACKENDS + ["sparse+fused"])
def test_batch_norm_over_a_single_visible_site_is_refused_naming_why(backend):
    """One visible patch in a batch of one leaves a single site at stride 32: batch statistics cannot be taken
    (torch's own error said "Expected more than 1 value per channel"); eval() runs."""
    from spark_sparse.backends.common import TooFewSitesError

    from spark_sparse.backends.fused import FusedBatchNormReLU
    from spark_sparse.speed import apply_speed_plan, plan_speed

    spark = ss.create_spark("resnet18", backend=backend.split("+")[0], input_size=64)
    if backend == "sparse+fused":            # the fast recipe's fused BatchNorm+ReLU takes its own statistics
        spark = apply_speed_plan(spark, plan_speed("fast", "cpu", backend="sparse"))
        assert any(isinstance(module, FusedBatchNormReLU) for module in spark.modules())
    active = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    active[0, 0, 0, 0] = True
    with pytest.raises(TooFewSitesError, match=r"BatchNorm \(512 channels, stride 32\) in training mode got one "
                                               r"visible site in the whole batch"):
        spark(torch.randn(1, 3, 64, 64), ActiveMask(active))
    spark.eval()
    assert torch.isfinite(spark(torch.randn(1, 3, 64, 64), ActiveMask(active)))
