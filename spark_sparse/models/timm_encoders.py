"""timm CNNs as SparK encoders: one generic encoder, per-family settings, and the timm-name fallback.

The timm model itself is kept (``self.model``), created with ``pretrained=False`` and
``num_classes=0``, so parameter names are timm's and :meth:`TimmEncoder.timm_state_dict` loads into
``timm.create_model(name, num_classes=0)`` with ``strict=True``.

The hierarchical forward is timm's own ``forward_intermediates`` (it only calls child modules, so it
runs on any backend's feature maps), asked for the ``feature_info`` entries at reductions 4, 8, 16
and 32 (the last entry at each: EfficientNet's stride-2 block and ResNet's stem are skipped), with
``norm=True`` (the final norm of pre-activation nets such as ResNet-V2 is part of the features, as
in their ``forward_features``) and ``stop_early=True``. Top-level children that this forward never
calls (classifier heads, EfficientNet's ``conv_head``) are found once, by a dense probe at
construction, and left out of conversion.

A family whose ``forward_intermediates`` cannot run on feature maps (it reads ``x.shape`` to unflatten a
token sequence, as EfficientFormer's) registers its own hierarchical forward, and the input size its
attention is built for (:func:`register_feature_forward`).

Families register their names with SparK-style defaults (:func:`register_timm_encoder`); any other
timm name works through a fallback when its layers are supported and its features come at strides
4..32 (a layer that is not fails at conversion, naming it). Model families also declare their
blocks (containers, converters) in their modules beside this one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import timm
import torch
import torch.nn as nn
from timm.layers import ConvNormAct, RmsNorm, SeparableConv2d, SeparableConvNormAct

from ..backends import register_container
from ..backends.common import RmsNorm2d, SimpleNorm, SimpleNorm2d
from ..backends.pools import fold_zero_pad_into_max_pool
from ..errors import SparkSparseError
from ..timm_compat import present
from .registry import register_model, register_model_fallback

__all__ = ["TimmEncoder", "guess_densify_norm", "register_timm_encoder", "register_timm_rewrite", "register_feature_forward",
           "hierarchical_feature_indices", "UnsuitableModelError"]

#: reductions of SparK's hierarchical features, finest first (the coarsest is the patch size)
REDUCTIONS = (4, 8, 16, 32)

# timm's conv -> norm+act (-> anti-aliasing slot: Identity or a blur pool) block, in many families, and its
# separable versions (depthwise conv -> 1x1 conv (-> norm+act): VoVNet's ``*_dw`` stems)
for _composite in (ConvNormAct, SeparableConv2d, SeparableConvNormAct):
    register_container(_composite)

#: in-place rewrites of a freshly created timm model into modules the backends convert, each with
#: the same maths and the same state dict (BiT's padded stem pool; families add theirs)
_MODEL_REWRITES: list[Callable[[nn.Module], object]] = [fold_zero_pad_into_max_pool]


def register_timm_rewrite(rewrite: Callable[[nn.Module], object]) -> Callable[[nn.Module], object]:
    """Apply ``rewrite(model)`` to every timm model a :class:`TimmEncoder` creates (registered or not),
    before its features are probed. It must keep the model's maths and parameter names exactly, or
    refuse (raise) where it cannot."""
    _MODEL_REWRITES.append(rewrite)
    return rewrite


@dataclass(frozen=True)
class FeatureForward:
    """A timm family's own hierarchical forward ``forward(model, x, feature_indices) -> maps``, used instead of
    its ``forward_intermediates``; ``probe_size``: the one input size its forward runs at (attention biases
    built for it), used by the construction probe instead of 64 px."""
    forward: Callable[[nn.Module, Any, list[int]], list]
    probe_size: Optional[int] = None


#: timm model class -> its own hierarchical forward (families whose forward_intermediates reads dense shapes)
_FEATURE_FORWARDS: dict[type, FeatureForward] = {}


def register_feature_forward(model_class: type, probe_size: Optional[int] = None):
    """Decorator: ``forward(model, x, feature_indices)`` computes the features of every timm model of
    ``model_class`` (registered names and the timm-name fallback alike). It must only call the model's
    child modules, like ``forward_intermediates``."""
    def wrap(forward):
        _FEATURE_FORWARDS[model_class] = FeatureForward(forward, probe_size)
        return forward
    return wrap


class UnsuitableModelError(SparkSparseError, ValueError):
    """A timm model that cannot be a SparK encoder (no features at strides 4..32, no forward_intermediates)
    or not with the options asked for (a drop path it does not have)."""


def hierarchical_feature_indices(model: nn.Module, name: str) -> list[int]:
    """Indices into ``model.feature_info`` of the last entry at each reduction 4, 8, 16, 32."""
    infos = list(getattr(model, "feature_info", None) or [])
    last_at = {int(info["reduction"]): index for index, info in enumerate(infos)}
    missing = [r for r in REDUCTIONS if r not in last_at]
    if missing or not hasattr(model, "forward_intermediates"):
        found = ", ".join(f"{info['module']}@{info['reduction']}" for info in infos) or "none"
        why = (f"it has no feature map at stride(s) {missing} (its feature_info: {found})" if missing
               else "it has no forward_intermediates")
        raise UnsuitableModelError(f"timm model {name!r} cannot be a SparK encoder: {why}; SparK needs feature maps "
                                   f"at strides {', '.join(map(str, REDUCTIONS))} (register a custom encoder instead)")
    return [last_at[r] for r in REDUCTIONS]


class TimmEncoder(nn.Module):
    """A timm CNN whose features at strides 4, 8, 16, 32 come from ``forward_intermediates``."""

    timm_name: str

    def __init__(self, timm_name: str, drop_path_rate: float = 0.0, densify_norm: Optional[str] = None,
                 **kwargs):
        super().__init__()
        self.timm_name = timm_name
        self.model = self._create(timm_name, drop_path_rate, kwargs)
        for rewrite in _MODEL_REWRITES:
            rewrite(self.model)
        self.feature_indices = hierarchical_feature_indices(self.model, timm_name)
        self._feature_forward = _FEATURE_FORWARDS.get(type(self.model))
        self.densify_norm = densify_norm or guess_densify_norm(self.model)
        self._outside = self._probe_unused_children(kwargs.get("in_chans", 3))

    @staticmethod
    def _create(timm_name: str, drop_path_rate: float, kwargs: dict) -> nn.Module:
        """``timm.create_model`` with exactly ``drop_path_rate``, 0 included: some entrypoints default
        to another rate (FasterNet-T2: 0.05), which would otherwise run unasked and unlogged. Nets whose
        constructor takes no rate (VGG, RepViT, ...) are created without one when it is 0, refused
        otherwise."""
        try:
            return timm.create_model(timm_name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate,
                                     **kwargs)
        except TypeError as error:
            if "drop_path_rate" not in str(error):
                raise
            if drop_path_rate:
                raise UnsuitableModelError(f"timm model {timm_name!r} has no drop path (its constructor takes no "
                                           f"drop_path_rate): pre-train it with --dp 0") from error
        return timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)

    def _probe_size(self) -> tuple[int, int]:
        """``(H, W)`` of the construction probe: the family's own input size (attention sized for it), the
        ``img_size`` of a strict patch embedding (timm's ``strict_img_size``: Swin's, whose forward asserts it),
        else 64 px (twice the patch size)."""
        if self._feature_forward is not None and self._feature_forward.probe_size is not None:
            return (self._feature_forward.probe_size,) * 2
        embed = getattr(self.model, "patch_embed", None)
        if getattr(embed, "strict_img_size", False) and getattr(embed, "img_size", None) is not None:
            return tuple(embed.img_size)
        return (2 * self.get_downsample_ratio(),) * 2

    def _probe_unused_children(self, in_chans: int) -> list[str]:
        """Top-level children of the timm model none of whose modules the hierarchical forward calls
        (dense probe at :meth:`_probe_size`, in eval mode, so no statistics change). Descendants count: timm may
        call a slice of a child (``self.blocks[:n]``), which is a new container around the same blocks."""
        called: set[int] = set()
        hooks = [module.register_forward_pre_hook(lambda module, args: called.add(id(module)))
                 for module in self.model.modules() if module is not self.model]
        was_training = self.model.training
        height, width = self._probe_size()
        side = f"{height}px" if height == width else f"{height}x{width}px"
        param = next(self.model.parameters())
        try:
            self.model.eval()
            with torch.no_grad():
                features = self.forward(torch.zeros(1, in_chans, height, width, dtype=param.dtype, device=param.device))
        except (RuntimeError, AssertionError, ValueError) as error:
            # timm's own checks, e.g. BoTNet/HaloNet position embeddings sized for one input (a bare
            # AssertionError), LambdaNet's relative positions or Inception-V4's unpadded convs (shape
            # errors): such a model cannot give SparK's features at every image size
            raise UnsuitableModelError(
                f"timm model {self.timm_name!r} cannot be a SparK encoder: its own forward fails on a {side} "
                f"image ({type(error).__name__}: {str(error) or 'no message'}); SparK needs a CNN that runs on "
                f"any multiple of {self.get_downsample_ratio()}px with features at exactly 1/4 to 1/32 of it "
                f"(attention sized for one input, as in BoTNet or HaloNet, or unpadded convs, as in "
                f"Inception-V4, are not)") from error
        finally:
            self.model.train(was_training)
            for hook in hooks:
                hook.remove()
        sizes = [tuple(f.shape[-2:]) for f in features]
        wanted = [(height // r, width // r) for r in REDUCTIONS]
        if sizes != wanted:
            raise UnsuitableModelError(f"timm model {self.timm_name!r}: its features at feature_info reductions "
                                       f"{list(REDUCTIONS)} have sizes {sizes} for a {side} input, not {wanted}")
        return [name for name, child in self.model.named_children()
                if not any(id(module) in called for module in child.modules())]

    def get_downsample_ratio(self) -> int:
        return REDUCTIONS[-1]

    def get_feature_map_channels(self) -> list[int]:
        return [self.model.feature_info[i]["num_chs"] for i in self.feature_indices]

    def modules_outside_hierarchy(self) -> list[str]:
        """Children the hierarchical forward never calls (heads): backends leave them as they are."""
        return [f"model.{name}" for name in self._outside]

    def forward(self, x, hierarchical: bool = True) -> list:
        if self._feature_forward is not None:
            features = self._feature_forward.forward(self.model, x, list(self.feature_indices))
        else:
            features = self.model.forward_intermediates(x, indices=list(self.feature_indices), norm=True,
                                                        stop_early=True, intermediates_only=True)
        return features if hierarchical else features[-1]

    def timm_state_dict(self) -> dict:
        """Weights as ``timm.create_model(self.timm_name, num_classes=0)`` names them."""
        return self.model.state_dict()

    def load_timm_state_dict(self, state: dict, strict: bool = True):
        return self.model.load_state_dict(state, strict=strict)


#: per-site channel norms: timm's LayerNorm2d subclasses nn.LayerNorm; its RMS norms do not
_LAYER_NORMS = present(nn.LayerNorm, RmsNorm, RmsNorm2d, SimpleNorm, SimpleNorm2d)


def guess_densify_norm(model: nn.Module) -> str:
    """SparK's choice by family: ``ln`` for LayerNorm (or RMS-norm) nets (ConvNeXt-like), ``bn`` otherwise (any
    encoder: a user's own model without a ``densify_norm`` attribute gets the same rule)."""
    has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    has_layer_norm = any(isinstance(m, _LAYER_NORMS) for m in model.modules())
    return "ln" if has_layer_norm and not has_batch_norm else "bn"


def register_timm_encoder(name: str, drop_path: float, densify_norm: str, tested: bool = False) -> None:
    """Register timm model ``name`` with SparK's default drop path and densify norm for its family."""
    def factory(drop_path_rate: float = drop_path, **kwargs) -> nn.Module:
        return TimmEncoder(name, drop_path_rate=drop_path_rate, densify_norm=densify_norm, **kwargs)
    factory.__name__ = name
    factory.__qualname__ = f"register_timm_encoder.<locals>.{name}"     # named in a registry collision message
    factory.__doc__ = f"timm ``{name}`` as a SparK encoder (default drop-path {drop_path}, densify norm {densify_norm})."
    register_model(name, default_drop_path=drop_path, tested=tested)(factory)


def _timm_fallback(name: str):
    """Any timm model name not registered here: a generic encoder (drop path 0 unless given)."""
    if not timm.is_model(name):
        return None

    def factory(drop_path_rate: float = 0.0, **kwargs) -> nn.Module:
        return TimmEncoder(name, drop_path_rate=drop_path_rate, **kwargs)
    return factory


register_model_fallback(_timm_fallback)
