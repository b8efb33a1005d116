"""Each layer type on every sparse backend equals ``masked`` on the same weights, input and mask."""
import pytest
import torch
import torch.nn as nn
from timm.layers import (BatchNormAct2d, Conv2dSame, EcaModule, EffectiveSEModule, GlobalContext, GroupNormAct,
                         LayerNorm2d, MixedConv2d, RmsNorm2d, ScaledStdConv2d, ScaledStdConv2dSame,
                         SeparableConvNormAct, SEModule, SimpleNorm2d, SpaceToDepth, StdConv2d, StdConv2dSame)
from timm.layers.blur_pool import BlurPool2d
from timm.layers.grn import GlobalResponseNorm
from timm.models._efficientnet_blocks import CondConvResidual, MobileAttention, SqueezeExcite
from timm.models.davit import ChannelBlock as DavitChannelBlock
from timm.models.davit import SpatialBlock as DavitSpatialBlock
from timm.models.edgenext import SplitTransposeBlock
from timm.models.pvt_v2 import PyramidVisionTransformerStage
from timm.models.twins import Block as TwinsBlock
from timm.models.swin_transformer import SwinTransformerStage
from timm.models.swin_transformer_v2 import SwinTransformerV2Stage
from timm.models.twins import PosConv as TwinsPosConv
from timm.models.efficientformer import Flat as EfficientFormerFlat
from timm.models.efficientformer import MetaBlock1d as EfficientFormerMetaBlock1d
from timm.models.efficientvit_mit import LiteMLA
from timm.models.swiftformer import Block as SwiftFormerBlock
from timm.models.swiftformer import EfficientAdditiveAttention
from timm.models.fastvit import Attention as FastVitAttention
from timm.models.fastvit import AttentionBlock as FastVitAttentionBlock
from timm.models.focalnet import FocalModulation
from timm.models.mobilevit import MobileVitBlock, MobileVitV2Block
from timm.models.hgnet import LearnableAffineBlock
from timm.models.metaformer import Attention as MetaFormerAttention
from timm.models.metaformer import (GroupNorm1NoBias, LayerNorm2dNoBias, LayerNormNoBias, MetaFormerStage, Pooling,
                                    StarReLU)

from spark_sparse import ActiveMask, register_container
from spark_sparse.backends.pools import ConstantPadMaxPool2d

from equivalence import assert_layer_pair_matches, run_layer_pair, sparse_backend_params

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}


def randomized(module: nn.Module, seed: int = 5) -> nn.Module:
    """``module`` with every parameter drawn from N(0, 1) (timm zero-initialises GRN, for example)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    return module


def scaled(module: nn.Module, factor: float) -> nn.Module:
    """``module`` with every parameter times ``factor``: a layer that multiplies the outputs of its own
    convs (FocalNet's ``q * h(ctx)``) has gradients of order weight^3, about 300 at N(0, 1) weights, where
    fp32 rounding alone passes the absolute tolerance; at 0.3 they are of order 1."""
    with torch.no_grad():
        for param in module.parameters():
            param.mul_(factor)
    return module


def fastvit_attention_block(dim: int, head_dim: int) -> FastVitAttentionBlock:
    """FastViT's attention block with heads of ``head_dim`` channels (timm's block fixes 32, and so a width of 32
    or more)."""
    block = FastVitAttentionBlock(dim, mlp_ratio=2.0)
    block.token_mixer = FastVitAttention(dim, head_dim=head_dim)
    return block


@register_container
class TokensAsMap(nn.Module):
    """``x.permute(0, 3, 1, 2)``: a token stage's output (a channels-last view) back to the map the table compares."""

    def forward(self, x):
        return x.permute(0, 3, 1, 2)


@register_container
class TwinsBlocksOnMap(nn.Module):
    """Twins blocks between a map and its tokens (``x.permute(0, 2, 3, 1)`` and back), the positional conv after
    the first, as a Twins stage runs them (its blocks ignore the map size here; converted modules only)."""

    def __init__(self, blocks: list[nn.Module], pos_block: nn.Module):
        super().__init__()
        self.blocks, self.pos_block = nn.ModuleList(blocks), pos_block

    def forward(self, x):
        tokens = x.permute(0, 2, 3, 1)
        for index, block in enumerate(self.blocks):
            tokens = block(tokens, None)
            if index == 0:
                tokens = self.pos_block(tokens, None)
        return tokens.permute(0, 3, 1, 2)


def twins_blocks(dim: int, windowed: bool) -> nn.Module:
    """Twins-SVT's pair of blocks (7x7 window attention, then global sub-sampled attention with keys from a
    stride-2 conv), or PCPVT's global one alone, 2 heads, a positional conv after the first."""
    window_sizes = (7, 1) if windowed else (1,)
    blocks = [TwinsBlock(dim, num_heads=2, mlp_ratio=2.0, sr_ratio=2, ws=ws) for ws in window_sizes]
    return TwinsBlocksOnMap(blocks, TwinsPosConv(dim, dim))


@register_container
class ChannelsLastStage(nn.Module):
    """A channels-last stage (Swin's: ``[B, H, W, C]`` in and out) between a map and its tokens, as the table
    gives and compares maps: ``stage(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)``."""

    def __init__(self, stage: nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, x):
        return self.stage(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def efficientformer_token_block(dim: int) -> nn.Module:
    """EfficientFormer's last-stage tail: the map flattened to tokens, one attention block (2 heads of 4-channel
    queries and keys, 8-channel values, biases for the 7x7 grid), the tokens as a map again."""
    block = EfficientFormerMetaBlock1d(dim, mlp_ratio=2.0)
    block.token_mixer = type(block.token_mixer)(dim, key_dim=4, num_heads=2, attn_ratio=2, resolution=7)
    return nn.Sequential(EfficientFormerFlat(), block, TokensAsMap())


# name -> (layer factory, input stride, input channels)
LAYERS = {
    "conv1x1": (lambda: nn.Conv2d(8, 12, 1, bias=False), 4, 8),
    "conv3x3": (lambda: nn.Conv2d(8, 12, 3, padding=1), 4, 8),
    "conv7x7": (lambda: nn.Conv2d(8, 8, 7, padding=3), 4, 8),
    "conv3x3_stride2": (lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1), 4, 8),
    "conv1x1_stride2": (lambda: nn.Conv2d(8, 12, 1, stride=2, bias=False), 4, 8),
    "conv2x2_stride2": (lambda: nn.Conv2d(8, 12, 2, stride=2), 4, 8),
    "stem7x7_stride2": (lambda: nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False), 1, 3),
    "stem4x4_stride4": (lambda: nn.Conv2d(3, 8, 4, stride=4), 1, 3),
    "conv3x3_dilated": (lambda: nn.Conv2d(8, 8, 3, padding=2, dilation=2), 4, 8),
    "depthwise7x7": (lambda: nn.Conv2d(8, 8, 7, padding=3, groups=8), 4, 8),
    "grouped3x3": (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=2), 4, 8),
    "grouped3x3_stride2": (lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4), 4, 8),
    "grouped1x1": (lambda: nn.Conv2d(8, 12, 1, groups=4, bias=False), 4, 8),
    "grouped1x1_stride2": (lambda: nn.Conv2d(8, 12, 1, stride=2, groups=2), 4, 8),
    "depthwise1x1": (lambda: nn.Conv2d(8, 8, 1, groups=8), 4, 8),
    "batchnorm": (lambda: nn.BatchNorm2d(8), 4, 8),
    "layernorm": (lambda: LayerNorm2d(8), 4, 8),
    "rms_norm": (lambda: randomized(RmsNorm2d(8)), 4, 8),
    "simple_norm": (lambda: randomized(SimpleNorm2d(8)), 4, 8),
    "relu_maxpool": (lambda: nn.Sequential(nn.ReLU(), nn.MaxPool2d(3, 2, 1)), 2, 8),
    "maxpool_signed": (lambda: nn.MaxPool2d(3, 2, 1), 2, 8),
    "avgpool": (lambda: nn.AvgPool2d(3, 2, 1), 4, 8),
    "avgpool_exclude_pad": (lambda: nn.AvgPool2d(3, 2, 1, count_include_pad=False), 4, 8),
    # timm's CNN families (issue 14); semantics in docs/sparse_semantics.md
    "avgpool_resnet_d": (lambda: nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False), 4, 8),
    # anti-aliased ResNets' blur pool: a fixed binomial depthwise filter, reflect padding at the map's border
    # (the stem's at stride 2); timm's "blurpc" variant pads with zeros (a 5x5 filter shared by every channel)
    "blur_pool_reflect": (lambda: BlurPool2d(8, filt_size=3, stride=2), 2, 8),
    "blur_pool_constant_5x5": (lambda: BlurPool2d(None, filt_size=5, stride=2, pad_mode="constant"), 4, 8),
    # TResNet's stem: space-to-depth (each 4x4 block of the image one stride-4 site of 48 channels), then a conv
    "space_to_depth_stem": (lambda: nn.Sequential(SpaceToDepth(), nn.Conv2d(48, 8, 3, padding=1)), 1, 3),
    # VoVNet's separable stem conv (depthwise 3x3, 1x1, BatchNorm + ReLU), strided
    "separable_conv_norm_act_stride2": (lambda: randomized(SeparableConvNormAct(8, 12, 3, stride=2)), 4, 8),
    "zero_padded_maxpool": (lambda: ConstantPadMaxPool2d(3, 2, 1), 2, 8),
    # HGNet-V2's stem: F.pad(x, (0, 1, 0, 1)) then a 2x2 stride-1 max-pool; its learnable scalar affine
    "zero_padded_maxpool_trailing_2x2": (lambda: ConstantPadMaxPool2d(2, 1, (0, 1, 0, 1)), 2, 8),
    "learnable_affine": (lambda: randomized(LearnableAffineBlock()), 4, 8),
    "std_conv3x3": (lambda: StdConv2d(8, 12, 3, padding=1), 4, 8),
    "std_conv1x1_stride2": (lambda: StdConv2d(8, 12, 1, stride=2), 4, 8),
    "scaled_std_conv3x3": (lambda: randomized(ScaledStdConv2d(8, 12, 3)), 4, 8),
    # TensorFlow "SAME" padding (timm's tf_* models): fewer zeros before than after on strided convs
    "conv_same3x3_stride2": (lambda: Conv2dSame(8, 12, 3, stride=2), 4, 8),
    "conv_same5x5_depthwise_stride2": (lambda: Conv2dSame(8, 8, 5, stride=2, groups=8), 4, 8),
    "conv_same_stem3x3_stride2": (lambda: Conv2dSame(3, 8, 3, stride=2, bias=False), 1, 3),
    "conv_same2x2_stride1": (lambda: Conv2dSame(8, 8, 2), 4, 8),
    "std_conv_same3x3_stride2": (lambda: StdConv2dSame(8, 12, 3, stride=2, padding="same"), 4, 8),
    "scaled_std_conv_same3x3_stride2": (lambda: randomized(ScaledStdConv2dSame(8, 12, 3, stride=2, padding="same")),
                                        4, 8),
    "mixed_conv_depthwise_3_5_7": (lambda: MixedConv2d(9, 9, [3, 5, 7], depthwise=True), 4, 9),
    "mixed_conv_same_stride2": (lambda: MixedConv2d(8, 12, [3, 5], stride=2, padding="same"), 4, 8),
    # HRNet's fusion: a coarse branch projected and upsampled (nearest) to a finer one
    "upsample_nearest_x2": (lambda: nn.Upsample(scale_factor=2, mode="nearest"), 8, 8),
    "conv_bn_upsample_x4": (lambda: randomized(nn.Sequential(nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6),
                                                             nn.Upsample(scale_factor=4.0, mode="nearest"))), 16, 8),
    "batchnorm_act_silu": (lambda: randomized(BatchNormAct2d(8, act_layer=nn.SiLU)), 4, 8),
    "batchnorm_act_hardswish": (lambda: randomized(BatchNormAct2d(8, act_layer=nn.Hardswish)), 4, 8),
    "batchnorm_act_leaky_relu": (lambda: randomized(BatchNormAct2d(8, act_layer=nn.LeakyReLU)), 4, 8),
    "groupnorm": (lambda: randomized(nn.GroupNorm(4, 8)), 4, 8),
    "groupnorm_act_gelu": (lambda: randomized(GroupNormAct(8, num_groups=2, act_layer="gelu")), 4, 8),
    "squeeze_excite_se_module": (lambda: randomized(SEModule(8, rd_channels=4)), 4, 8),
    "squeeze_excite_efficientnet": (lambda: randomized(SqueezeExcite(8, rd_channels=4, gate_layer=nn.Hardsigmoid)), 4, 8),
    "effective_squeeze_excite": (lambda: randomized(EffectiveSEModule(8)), 4, 8),
    "eca": (lambda: randomized(EcaModule(channels=8)), 4, 8),
    "global_context": (lambda: randomized(GlobalContext(8, fuse_add=True, rd_channels=4)), 4, 8),
    "global_response_norm": (lambda: randomized(GlobalResponseNorm(8, channels_last=False)), 4, 8),
    # ConvFormer's activation (nonzero at 0: scale * relu(x) ** 2 + bias) and its bias-free LayerNorm
    "star_relu": (lambda: randomized(StarReLU()), 4, 8),
    "layernorm_no_bias": (lambda: randomized(LayerNorm2dNoBias(8)), 4, 8),
    # PoolFormer-V2's token mixer avgpool3x3(x) - x (padding not counted) and its one-group GroupNorm
    "pooling_mixer": (lambda: Pooling(3), 4, 8),
    "groupnorm1_no_bias": (lambda: randomized(GroupNorm1NoBias(8)), 4, 8),
    # FocalNet's modulation: one-channel gates times the context, depthwise focal levels, a global context
    # over each image's active sites, LayerNorm after the modulation
    "focal_modulation": (lambda: scaled(randomized(FocalModulation(8, focal_window=3, focal_level=2, use_post_norm=True,
                                                                   normalize_modulator=True)), 0.3), 4, 8),
    # EfficientViT's ReLU linear attention over each image's active sites, multi-scale (5x5 depthwise) q, k, v
    "lite_mla": (lambda: scaled(randomized(LiteMLA(8, 8, dim=4)), 0.5), 4, 8),
    # EdgeNeXt's split-transpose block: channel groups through depthwise convs, a positional encoding at
    # active sites, cross-covariance attention over each image's active tokens, NHWC LayerNorm and MLP
    "split_transpose_xca": (lambda: randomized(SplitTransposeBlock(8, num_scales=2, num_heads=2)), 4, 8),
    # SwiftFormer's additive attention (one global query vector per image over its active tokens), alone and
    # in its block (local representation, layer scales, BatchNorm MLP; weights times 0.5: at N(0, 1) the
    # block's outputs and input gradients reach ~50, where fp32 rounding alone passes 1e-4 absolute)
    "efficient_additive_attention": (lambda: randomized(EfficientAdditiveAttention(8, 8)), 4, 8),
    "swiftformer_block": (lambda: scaled(randomized(SwiftFormerBlock(8, mlp_ratio=2.0)), 0.5), 4, 8),
    # CAFormer's attention stage (at stride 16, as CAFormer's third): tokens channels last, bias-free LayerNorm,
    # 2-head softmax attention among each image's active tokens, residual scales, a Linear StarReLU MLP
    "caformer_attention_stage": (lambda: scaled(randomized(
        MetaFormerStage(8, 8, depth=1, token_mixer=MetaFormerAttention, norm_layer=LayerNormNoBias, dp_rates=[0.0],
                        res_scale_init_value=1.0, head_dim=4)), 0.5), 16, 8),
    # FastViT-SA's attention block: BatchNorm, attention among each image's active tokens of the map (2 heads),
    # layer scales, ConvMlp (depthwise 7x7, 1x1 convs, GELU); weights x 0.25: at 0.5, 32 channels give input
    # gradients of ~90, where fp32 rounding alone (2e-6 relative) passes 1e-4 absolute; here they are ~4
    "fastvit_attention_block": (lambda: scaled(randomized(fastvit_attention_block(32, head_dim=16)), 0.25), 16, 32),
    # MobileNet-V4-Hybrid's attention block: a depthwise positional conv, BatchNorm, multi-query attention (2 query
    # heads, one key and value per site of a depthwise stride-2 conv's map) among each image's active tokens, layer
    # scale. At stride 8 (the nets' is 16): keys at stride 16, where one visible patch still has 4 sites for the
    # key path's BatchNorm (at stride 32 it would have 1, which BatchNorm refuses in training)
    "mobile_attention_kv_stride2": (lambda: scaled(randomized(
        MobileAttention(8, 8, num_heads=2, key_dim=4, value_dim=4, use_multi_query=True, kv_stride=2,
                        use_cpe=True)), 0.5), 8, 8),
    # MobileViT's block: convs, the map unfolded into its 2x2 patch positions (one token sequence per image and
    # position), a ViT transformer (LayerNorm, 2-head attention among each sequence's active tokens, Linear MLP),
    # folded back, projected and fused with the input
    "mobilevit_block": (lambda: scaled(randomized(
        MobileVitBlock(8, 8, transformer_dim=8, transformer_depth=1, patch_size=2, num_heads=2)), 0.5), 16, 8),
    # MobileViT-V2's block: depthwise and 1x1 convs, a transformer of GroupNorm1 (per image over its active sites),
    # separable self-attention (each 2x2 patch position's softmax context over its active tokens) and a 1x1 MLP
    "mobilevit_v2_block": (lambda: scaled(randomized(
        MobileVitV2Block(8, 8, transformer_dim=8, transformer_depth=1, patch_size=2)), 0.5), 16, 8),
    # DaViT's blocks: a depthwise positional conv, LayerNorm, 2-head attention among the active tokens of each 7x7
    # window (at stride 16 the 14x14 map has 4 windows) or across channels over each image's active tokens (V1: k^T v
    # applied to q; V2: q^T k with q scaled by the image's active count^-1/2, applied to v), a Linear MLP
    "davit_spatial_block": (lambda: scaled(randomized(DavitSpatialBlock(8, num_heads=2, window_size=7)), 0.5), 16, 8),
    "davit_channel_block": (lambda: scaled(randomized(DavitChannelBlock(8, num_heads=2, qkv_bias=True)), 0.5), 4, 8),
    "davit_channel_block_v2": (lambda: scaled(randomized(
        DavitChannelBlock(8, num_heads=2, qkv_bias=True, v2=True)), 0.5), 8, 8),
    # EfficientFormer's attention block at stride 32 (the 7x7 map of a 224 px image): LayerNorm, softmax attention
    # among each image's active tokens plus a learnt bias per head and relative position, layer scales, Linear MLP
    "efficientformer_token_block": (lambda: scaled(randomized(efficientformer_token_block(8)), 0.5), 32, 8),
    # PVT-v2's stage: a 3x3 stride-2 patch embedding (conv, LayerNorm on the tokens), a block of spatial-reduction
    # attention (2 heads; keys and values from a conv of kernel = stride = 2, i.e. on the stride-32 patch grid,
    # among each image's active patches) and an MLP with a depthwise 3x3 conv, the final LayerNorm; and the last
    # stage's kind, whose keys are the active tokens themselves
    "pvt_v2_stage": (lambda: scaled(randomized(PyramidVisionTransformerStage(
        8, 8, depth=1, num_heads=2, sr_ratio=2, mlp_ratio=2.0)), 0.5), 8, 8),
    "pvt_v2_stage_self_attention": (lambda: scaled(randomized(PyramidVisionTransformerStage(
        8, 8, depth=1, num_heads=2, sr_ratio=1, mlp_ratio=2.0)), 0.5), 16, 8),
    # Twins' blocks at stride 16 (keys of the global attention at 32): PCPVT's global sub-sampled attention; SVT's
    # window attention among each 7x7 window's active tokens (the 14x14 map has 4) then the global one; a
    # depthwise positional conv plus the tokens after the first block
    "twins_pcpvt_blocks": (lambda: scaled(randomized(twins_blocks(8, windowed=False)), 0.5), 16, 8),
    "twins_svt_blocks": (lambda: scaled(randomized(twins_blocks(8, windowed=True)), 0.5), 16, 8),
    # Swin's stage at stride 8 (its second's kind): patch merging (2x2 neighbourhoods side by side, LayerNorm,
    # Linear) to the 14x14 map at stride 16, then a block of attention among the active tokens of each 7x7 window
    # with the relative position bias of each pair, and a block of shifted windows (the map rolled by -3, timm's
    # -100 between regions); LayerNorm, Linear MLPs
    "swin_stage": (lambda: scaled(randomized(ChannelsLastStage(SwinTransformerStage(
        8, 16, input_resolution=(28, 28), depth=2, num_heads=2, window_size=7, mlp_ratio=2.0))), 0.5), 8, 8),
    # Swin-V2's stage, the same shape: patch merging (2x2 neighbourhoods, Linear, then LayerNorm), blocks of cosine
    # attention (a learnt logit scale per head) with continuous position biases (an MLP of the pair's log-spaced
    # offset), unshifted then shifted, LayerNorm after the attention and after the MLP (residual post-norm)
    "swinv2_stage": (lambda: scaled(randomized(ChannelsLastStage(SwinTransformerV2Stage(
        8, 16, input_resolution=(28, 28), depth=2, num_heads=2, window_size=7, mlp_ratio=2.0, downsample=True))),
        0.5), 8, 8),
    # CondConv EfficientNet's block: routing weights from each image's mean over its active sites, expert-mixed
    # 1x1, depthwise 3x3 (strided) and 1x1 convs per image (timm's grouped conv on the dense masked map)
    "condconv_residual": (lambda: scaled(randomized(CondConvResidual(8, 8, exp_ratio=2.0, num_experts=3)), 0.5), 4, 8),
    "condconv_residual_stride2": (lambda: scaled(randomized(
        CondConvResidual(8, 12, stride=2, exp_ratio=2.0, num_experts=3)), 0.5), 4, 8),
}

#: fp32 tolerances of layers whose input gradient is a long sum: each site's gradient through linear attention
#: (LiteMLA) sums over every site of its image, about 1000 terms reaching 70 here, so two fp32 summation
#: orders differ by up to 2e-5 of the largest gradient (1.5e-3 absolute; median element 6e-7 relative); in
#: fp64 the layer agrees to 1e-10 like every other. SwiftFormer's depthwise conv feeds a training-mode BatchNorm,
#: which cancels its bias: the bias gradient is 0 (5e-14 in fp64), and in fp32 what is left is the rounding of
#: sums of terms near 1e2, 5e-5 on two threads and 1e-4 on one (OMP_NUM_THREADS=1), which the default tolerance
#: met only on two (every other gradient of the block agrees to 2e-6 relative)
FP32_TOLERANCE_OF = {"lite_mla": 5e-3, "swiftformer_block": 3e-4}

MASKS = {   # name -> (batch, patch grid); images are grid * 32 px, so stride-4 maps are >= 56 px wide
    "random_b4": lambda: ActiveMask.random(4, (7, 7), 0.6, generator=torch.Generator().manual_seed(0)),
    "random_b1_nonsquare": lambda: ActiveMask.random(1, (7, 9), 0.6, generator=torch.Generator().manual_seed(1)),
    "one_visible_b1": lambda: ActiveMask(torch.eye(7, dtype=torch.bool)[3:4, :].view(1, 1, 1, 7).repeat(1, 1, 7, 1)
                                         & torch.eye(7, dtype=torch.bool)[3].view(1, 1, 7, 1)),
    "all_visible_b1": lambda: ActiveMask.full(1, (7, 7)),
}


#: layers whose maps must have a shape of their own: DaViT's, Twins-SVT's and Swin's 7x7 windows tile the square
#: grids' 14x14 map at stride 16, not the non-square one's 14x18 (no window size both tile and straddle its patches;
#: Swin's and Swin-V2's stages are also built for their map size, as timm's); EfficientFormer's attention biases
#: exist for a 7x7 grid alone. That mask is not paired with them (the layers refuse such maps:
#: tests/test_models_semantics.py)
SQUARE_GRID_LAYERS = {"davit_spatial_block", "efficientformer_token_block", "twins_svt_blocks", "swin_stage",
                      "swinv2_stage"}


def masks_for(layer_name: str) -> list[str]:
    """The masks a layer of the table is checked on."""
    return [name for name in MASKS if not (layer_name in SQUARE_GRID_LAYERS and name == "random_b1_nonsquare")]


@pytest.mark.parametrize("backend", sparse_backend_params())
@pytest.mark.parametrize("layer_name,mask_name", [pytest.param(layer, mask, id=f"{mask}-{layer}")
                                                  for layer in LAYERS for mask in masks_for(layer)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_layer_matches_masked(backend, layer_name, mask_name, dtype):
    factory, stride, channels = LAYERS[layer_name]
    mask = MASKS[mask_name]()
    layer = factory()
    tolerance = FP32_TOLERANCE_OF.get(layer_name, TOLERANCE[dtype]) if dtype == torch.float32 else TOLERANCE[dtype]
    assert_layer_pair_matches(run_layer_pair(layer, backend, mask, stride, channels, dtype), backend, mask, tolerance)


def test_one_visible_mask_has_exactly_one_patch():
    assert int(MASKS["one_visible_b1"]().active.sum()) == 1


def test_grouped_gemm_op_passes_opcheck():
    """The batched-GEMM grouped conv (ResNeXt/RegNet groups on the gemm kernel) is a well-formed custom op."""
    from spark_sparse.kernels import ConvCall
    from spark_sparse.kernels.gemm import gather_grouped_conv, transposed_table

    mask = MASKS["random_b4"]()
    for stride in (1, 2):
        call = ConvCall(mask, 4, 4 * stride, (3, 3), (1, 1), (1, 1), 4)
        gen = torch.Generator().manual_seed(stride)
        x = torch.randn(mask.num_active(4), 8, generator=gen, dtype=torch.float64, requires_grad=True)
        w = torch.randn(12, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
        torch.library.opcheck(gather_grouped_conv, (x, w, call.neighbours(), transposed_table(call), 4))
