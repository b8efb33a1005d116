"""timm's EfficientNets, MixNets and MobileNet-V3/V4s (``_efficientnet_blocks``) on every backend.

Their blocks (``DepthwiseSeparableConv``, ``InvertedResidual``, ``ConvBnAct``, EfficientNet-V2's
``EdgeResidual``, MobileNet-V4's ``UniversalInvertedResidual``) only call children and add, and
MixNet's ``MixedConv2d`` splits the channels into groups, convolves each with its own kernel size
and concatenates them (``torch.split`` / ``torch.cat`` along ``dim=1``): containers all. The
``tf_*`` ports pad their strided convs TensorFlow-"SAME"-style (``Conv2dSame``), which every backend
runs exactly (:mod:`spark_sparse.backends.same_padding`). Their layers are convs (depthwise
included), ``BatchNormAct2d`` with SiLU / ReLU / hard-swish, MobileNet-V4's ``LayerScale2d`` (a
per-channel factor at each site), and the family's own ``SqueezeExcite``, converted here as an
:class:`~spark_sparse.backends.attention.ImageGate`: squeeze over each image's active sites, the
block's own ``conv_reduce -> act1 -> conv_expand -> gate`` on the squeezed vector, gate on features.
MobileNet-V4's hybrid models add attention blocks (``MobileAttention``: an optional depthwise
positional conv, BatchNorm, attention, layer scale, residual add: a container) whose
``MultiQueryAttention2d`` is converted here (:class:`FeatureMultiQueryAttention2d`): queries per head
from a 1x1 conv, one key and one value per site shared by every head, from a depthwise conv at
``kv_stride`` (stride 16 -> 32 in the medium and large nets), BatchNorm and a 1x1 conv; softmax
attention among each image's ACTIVE tokens (:mod:`~spark_sparse.backends.token_attention`: masked
positions are neither keys nor values). Query strides (an average pool before, bilinear upsampling
after) are refused at conversion, by the upsampling layer.

CondConv EfficientNets (``efficientnet_cc_*``) route each image to a mixture of expert kernels:
``CondConvResidual`` averages the block input over each image's ACTIVE sites (as SE's squeeze), a Linear
and a sigmoid give per-image routing weights, and each ``CondConv2d`` convolves image ``b`` with
``sum_e r[b, e] W_e`` (and bias). :class:`FeatureCondConv2d` runs timm's own per-image convolution on the
map scattered to dense (masked sites 0, as SparK's dense conv reads them) and keeps the output's active
sites: the dense path, at the cost of masked sites, for these layers only.

Features at strides 4..32 are timm's ``feature_info`` entries at those reductions (the stride-2
block and the ``conv_head`` are not part of the hierarchy). Default drop path 0: SparK pre-trained
no model this small (SparK's ``--dp`` default; ResNet-18/34 use 0 too), 0.05 for EfficientNet-V2-S
(ResNet-50-sized). Densify norm BatchNorm.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import CondConv2d, LayerScale2d, MixedConv2d
from timm.layers.attention2d import MultiQueryAttention2d
from timm.models._efficientnet_blocks import (CondConvResidual, ConvBnAct, DepthwiseSeparableConv, EdgeResidual,
                                              InvertedResidual, MobileAttention, SqueezeExcite,
                                              UniversalInvertedResidual)
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3

from ..backends import register_container, register_converter
from ..backends.common import adopt_module, adopt_state
from ..backends.attention import ImageGate
from ..backends.per_image import image_means
from ..backends.token_attention import attend_among_active_tokens, describe_token_attention
from ..features import FeatureMap, MaskedDense, SparseRows, UnsupportedFeatureOperation
from .timm_encoders import register_timm_encoder

__all__ = ["FeatureCondConv2d", "FeatureCondConvResidual", "FeatureLayerScale2d", "FeatureMultiQueryAttention2d",
           "FeatureSqueezeExcite"]

for _composite in (EfficientNet, MobileNetV3, DepthwiseSeparableConv, InvertedResidual, ConvBnAct, EdgeResidual,
                   UniversalInvertedResidual, MixedConv2d, MobileAttention):
    register_container(_composite)


@register_converter(LayerScale2d)
class FeatureLayerScale2d(nn.Module):
    """timm's ``LayerScale2d``: each active site's channels times ``gamma`` (masked sites stay zero)."""

    def __init__(self, backend, scale: LayerScale2d, name: str = ""):
        super().__init__()
        self.gamma = scale.gamma

    def forward(self, x: FeatureMap) -> FeatureMap:
        return x.per_site(lambda v: v * self.gamma)


class FeatureSqueezeExcite(ImageGate):
    """EfficientNet / MobileNet-V3 ``SqueezeExcite``: ``conv_reduce -> act1 -> conv_expand -> gate``."""

    def excite(self, squeezed: torch.Tensor) -> torch.Tensor:
        return self.gate(self.conv_expand(self.act1(self.conv_reduce(squeezed))))


register_converter(SqueezeExcite)(FeatureSqueezeExcite.from_dense)


@register_converter(MultiQueryAttention2d)
class FeatureMultiQueryAttention2d(nn.Module):
    """MobileNet-V4's multi-query attention among each image's active tokens. The same children (``query``,
    ``key``, ``value`` and ``output``, converted: convs, BatchNorm, pools; ``attn_drop``), names and parameters."""

    def __init__(self, backend, attention: MultiQueryAttention2d, name: str = ""):
        super().__init__()
        self.num_heads, self.key_dim, self.value_dim = attention.num_heads, attention.key_dim, attention.value_dim
        self.scale = attention.scale
        for child in ("query", "key", "value", "output"):
            setattr(self, child, backend.convert_module(getattr(attention, child), f"{name}.{child}"))
        self.attn_drop = attention.attn_drop
        self.feature_type = backend.feature_type
        self.train(attention.training)

    def describe_execution(self, device, dtype) -> str:
        return describe_token_attention(self.feature_type)

    def forward(self, x: FeatureMap) -> FeatureMap:
        queries, keys, values = self.query(x), self.key(x), self.value(x)
        query = queries.active_rows().view(-1, self.num_heads, self.key_dim)     # channel = head * key_dim + d
        key = keys.active_rows().unsqueeze(1).expand(-1, self.num_heads, -1)       # one key per site, every head
        value = values.active_rows().unsqueeze(1).expand(-1, self.num_heads, -1)
        out = attend_among_active_tokens(queries, query, keys, key, value, self.scale,
                                         self.attn_drop.p if self.training else 0.0)
        return self.output(queries.with_active_rows(out))


class FeatureCondConv2d(CondConv2d):
    """timm's ``CondConv2d`` (per-image mixtures of expert kernels) on the dense masked map, output at the active
    sites of its stride. The same parameters (``weight``: ``[experts, O * I / groups * kh * kw]``, ``bias``)."""

    layer_name: str = ""

    def forward(self, x: FeatureMap, routing_weights: torch.Tensor) -> FeatureMap:
        stride = x.stride * self.stride[0]
        site = x.mask.dense_at(stride)
        out = super().forward(x.to_dense(), routing_weights)
        if self.stride[0] != self.stride[1] or out.shape[-2:] != site.shape[-2:]:
            raise UnsupportedFeatureOperation(
                f"{self.layer_name}: CondConv2d maps a {tuple(x.to_dense().shape[-2:])} grid to "
                f"{tuple(out.shape[-2:])}, not the grid of stride {stride} ({tuple(site.shape[-2:])})")
        if isinstance(x, MaskedDense):
            return MaskedDense(out * site, x.mask, stride)
        return SparseRows(out.permute(0, 2, 3, 1)[site[:, 0]], x.mask, stride)

    def describe_execution(self, device, dtype) -> str:
        return "dense      CondConv2d: per-image expert mixture, timm's grouped conv of the masked map"

    @classmethod
    def from_dense(cls, backend, conv: CondConv2d, name: str = "") -> "FeatureCondConv2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding=0, dilation=conv.dilation,
                  groups=conv.groups, bias=conv.bias is not None, num_experts=conv.num_experts)
        new.padding, new.dynamic_padding, new.layer_name = conv.padding, conv.dynamic_padding, name   # as built by timm
        return adopt_state(new, conv)


register_converter(CondConv2d)(FeatureCondConv2d.from_dense)


@register_converter(CondConvResidual)
class FeatureCondConvResidual(nn.Module):
    """timm's ``CondConvResidual``: routing weights from the block input's mean over each image's active sites,
    then timm's inverted residual with the routed convs. The same children (converted) and names."""

    def __init__(self, backend, block: CondConvResidual, name: str = ""):
        super().__init__()
        adopt_module(self, block)
        backend.convert_children(self, prefix=f"{name}.", skip=frozenset({f"{name}.routing_fn"}))
        self.has_skip = block.has_skip

    def forward(self, x: FeatureMap) -> FeatureMap:
        shortcut = x
        pooled = image_means(x).to(self.routing_fn.weight.dtype)
        routing_weights = torch.sigmoid(self.routing_fn(pooled))
        x = self.bn1(self.conv_pw(x, routing_weights))
        x = self.bn2(self.conv_dw(x, routing_weights))
        x = self.bn3(self.conv_pwl(self.se(x), routing_weights))
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


for _name in ("efficientnet_b0", "mobilenetv3_large_100", "mobilenetv4_conv_small", "mixnet_s", "tf_efficientnet_b0"):
    register_timm_encoder(_name, 0.0, densify_norm="bn", tested=True)
register_timm_encoder("tf_efficientnetv2_s", 0.05, densify_norm="bn", tested=True)
register_timm_encoder("mobilenetv4_hybrid_medium", 0.0, densify_norm="bn", tested=True)
register_timm_encoder("efficientnet_cc_b0_4e", 0.0, densify_norm="bn", tested=True)
