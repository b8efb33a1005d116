"""timm's ResNeSt (split attention) and SKNet (selective kernel) on every backend.

Both layers run several convolutions' outputs side by side, squeeze their sum to one vector per
image, turn it into a softmax over the branches per channel, and return the branches' gated sum:

- ``SplitAttn`` (ResNeSt's ``conv2``): one grouped conv makes ``radix`` groups of ``C`` channels
  (timm reshapes to ``(B, radix, C, H, W)``: group ``r`` is channels ``[r*C, (r+1)*C)``, a channel
  slice of the same active sites); its ``conv``/``bn0``/``drop``/``act0`` are converted by the backend;
- ``SelectiveKernel`` (SKNet's): ``paths`` of ``ConvNormAct`` (3x3 convs, dilated), each on the whole
  input or, with ``split_input=True``, on its own channel group of it (``torch.split`` along channels);
  the paths are converted by the backend.

What is exact and why: every branch holds the same active sites, so slicing, splitting and adding
them is exact on both representations (:class:`~spark_sparse.features.FeatureMap`). The squeeze,
timm's ``.mean((2, 3))``, is the mean over each image's ACTIVE sites (SparK issue 54, as SE in
:mod:`spark_sparse.backends.attention`). The attention is timm's own dense modules, unchanged, on the
squeezed ``[B, C, 1, 1]`` tensor (``fc1 -> bn1 -> act1 -> fc2 -> rsoftmax``; SelectiveKernelAttn's
``fc_reduce -> bn -> act -> fc_select``, then timm's softmax over the paths), so parameter names and
state dicts stay timm's. The weighted sum multiplies each branch by its per-image, per-channel gate
(:func:`~spark_sparse.backends.per_image.scale_per_image`): masked sites stay exactly zero. With every
site visible this is timm's forward.

Refused: a DropBlock in ``SplitAttn.drop`` (timm's ``drop_block_rate``; it zeroes blocks of positions,
which mixes masked and active sites), at conversion, naming the module; SKNet's DropBlock sits in its
paths' ``BatchNormAct2d.drop`` and is refused there. An anti-aliasing blur pool in a path's ``aa`` slot
(``aa_layer=BlurPool2d``) is a layer the backends convert.

ResNeSt and SKNet are timm ``ResNet`` models (a container, :mod:`.resnet`) with their own blocks,
which only compose children and add: containers. ResNeSt's other layers are the ResNet-D deep stem,
the ``AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)`` shortcut, and the ``avd``
``AvgPool2d(3, 2, padding=1)`` (padding counted as SparK's dense pool counts it) between ``conv2``
and ``conv3`` of each downsampling block. Default drop path 0.05 for the ResNet-50-sized nets, 0 for
the small ones (SparK's rates, as :mod:`.resnet`); densify norm BatchNorm.

Conditioning: the attention's BatchNorm normalises over the batch of squeezed vectors, so with a
batch of 2 a channel whose two values nearly agree amplifies round-off (full-depth
``skresnext50_32x4d`` at 64 px, batch 2: ~1e-9 in fp64 gradients, as much between ``masked`` and
``masked`` in channels-last; 1e-12 at batch 4).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import SelectiveKernel, SplitAttn
from timm.models.resnest import ResNestBottleneck
from timm.models.sknet import SelectiveKernelBasic, SelectiveKernelBottleneck

from ..backends import UnsupportedModuleError, register_container, register_converter
from ..backends.fused import register_bn_relu_pairs
from ..backends.per_image import image_means, scale_per_image
from ..features import FeatureMap
from .timm_encoders import register_timm_encoder

__all__ = ["FeatureSplitAttn", "FeatureSelectiveKernel"]


def _gated_sum(branches: tuple[FeatureMap, ...], gates: torch.Tensor) -> FeatureMap:
    """``sum_r branches[r] * gates[:, r]`` with ``gates`` ``[B, R, C]`` (per image, branch, channel)."""
    return sum(scale_per_image(branch, gates[:, r]) for r, branch in enumerate(branches))


def _squeeze(branches: tuple[FeatureMap, ...]) -> torch.Tensor:
    """``[B, C, 1, 1]``: the branches' sum, averaged over each image's active sites (timm's
    ``x.sum(1).mean((2, 3), keepdim=True)`` with the mean over visible sites only)."""
    summed = sum(branches)
    return image_means(summed).view(summed.mask.batch_size, summed.channels, 1, 1)


@register_converter(SplitAttn)
class FeatureSplitAttn(nn.Module):
    """timm's ``SplitAttn`` on a feature map: same children, so same parameter names."""

    def __init__(self, backend, split: SplitAttn, name: str):
        super().__init__()
        self.radix = split.radix
        self.conv = backend.convert_module(split.conv, f"{name}.conv")
        self.bn0 = backend.convert_module(split.bn0, f"{name}.bn0")
        try:
            self.drop = backend.convert_module(split.drop, f"{name}.drop")
        except UnsupportedModuleError as error:
            raise UnsupportedModuleError(
                f"backend {backend.name!r} cannot convert {name}.drop ({type(split.drop).__qualname__}): a DropBlock "
                f"zeroes square blocks of positions, masked and visible alike, which has no meaning on active "
                f"sites; build the model with drop_block_rate=0") from error
        self.act0 = backend.convert_module(split.act0, f"{name}.act0")
        # the attention: timm's own modules on the squeezed [B, C, 1, 1] tensor
        self.fc1, self.bn1, self.act1, self.fc2 = split.fc1, split.bn1, split.act1, split.fc2
        self.rsoftmax = split.rsoftmax
        self.train(split.training)

    def forward(self, x: FeatureMap) -> FeatureMap:
        x = self.act0(self.drop(self.bn0(self.conv(x))))
        groups = x.split(x.channels // self.radix, dim=1)           # radix groups of C channels
        attn = self.fc2(self.act1(self.bn1(self.fc1(_squeeze(groups)))))
        gates = self.rsoftmax(attn).view(x.mask.batch_size, self.radix, -1)   # group r: columns [r*C, (r+1)*C)
        return _gated_sum(groups, gates)


@register_converter(SelectiveKernel)
class FeatureSelectiveKernel(nn.Module):
    """timm's ``SelectiveKernel`` on a feature map: converted ``paths``, timm's own ``attn``."""

    def __init__(self, backend, kernel: SelectiveKernel, name: str):
        super().__init__()
        self.num_paths, self.in_channels, self.split_input = kernel.num_paths, kernel.in_channels, kernel.split_input
        self.paths = nn.ModuleList([backend.convert_module(path, f"{name}.paths.{i}")
                                    for i, path in enumerate(kernel.paths)])
        self.attn = kernel.attn          # SelectiveKernelAttn, run on the squeezed [B, C, 1, 1] tensor
        self.train(kernel.training)

    def forward(self, x: FeatureMap) -> FeatureMap:
        if self.split_input:
            inputs = x.split(self.in_channels // self.num_paths, dim=1)
        else:
            inputs = (x,) * self.num_paths
        branches = tuple(path(part) for path, part in zip(self.paths, inputs))
        attn = self.attn
        logits = attn.fc_select(attn.act(attn.bn(attn.fc_reduce(_squeeze(branches)))))
        gates = torch.softmax(logits.view(x.mask.batch_size, self.num_paths, -1), dim=1)   # timm's view + softmax
        return _gated_sum(branches, gates)


for _composite in (ResNestBottleneck, SelectiveKernelBasic, SelectiveKernelBottleneck):
    register_container(_composite)

# BatchNorm -> ReLU called back to back; the ReLU output feeds SplitAttn's conv (or the avd pool).
register_bn_relu_pairs(ResNestBottleneck, ("bn1", "act1", ()))

#: name -> SparK-style default drop path (0.05 ResNet-50-sized, 0 small), checked on every backend
_NETS = {"resnest14d": 0.0, "resnest50d": 0.05, "skresnet18": 0.0, "skresnext50_32x4d": 0.05}
for _name, _dp in _NETS.items():
    register_timm_encoder(_name, _dp, densify_norm="bn", tested=True)
