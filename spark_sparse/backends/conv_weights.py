"""Convolutions whose effective weight is a function of their parameters (weight standardisation).

timm's ``StdConv2d`` (BiT ResNet-V2) and ``ScaledStdConv2d`` (NF-Nets) are ``nn.Conv2d`` subclasses
that standardise their weight (per output channel, over ``C/groups * kh * kw``) before the
convolution. The standardisation touches only the weight, never the features, so on every backend
the layer is "standardise the weight, then the backend's own (masked or sparse) convolution".

Each supported conv type maps to a :data:`WeightTransform` here, by exact type (``nn.Conv2d`` maps
to ``None``: the weight as it is). A backend's conv converter accepts exactly the types of
:data:`WEIGHT_TRANSFORMS` and stores the transform; its forward calls
:func:`weight_for_forward`. The TensorFlow-"SAME" variants (``Conv2dSame``, ``StdConv2dSame``,
``ScaledStdConv2dSame``) are listed with their base's transform; their padding is
:mod:`.same_padding`'s business. A conv subclass not listed (``CondConv2d``, ...) is refused by the
conversion walk, never run as a plain conv.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame

__all__ = ["WeightTransform", "WEIGHT_TRANSFORMS", "standardized_weight", "scaled_standardized_weight",
           "weight_transform_of", "weight_for_forward", "copy_transform_attributes"]

#: ``conv -> the weight its forward uses`` (``[O, C/groups, kh, kw]``), differentiable in the conv's parameters
WeightTransform = Callable[[nn.Conv2d], torch.Tensor]


def standardized_weight(conv: nn.Conv2d) -> torch.Tensor:
    """``StdConv2d``: each output channel's weight to zero mean and unit (biased) variance, as timm does."""
    return F.batch_norm(conv.weight.reshape(1, conv.out_channels, -1), None, None, training=True, momentum=0.0,
                        eps=conv.eps).reshape_as(conv.weight)


def scaled_standardized_weight(conv: nn.Conv2d) -> torch.Tensor:
    """``ScaledStdConv2d``: standardised weight times ``gain * gamma / sqrt(fan_in)``, as timm does."""
    return F.batch_norm(conv.weight.reshape(1, conv.out_channels, -1), None, None,
                        weight=(conv.gain * conv.scale).view(-1), training=True, momentum=0.0,
                        eps=conv.eps).reshape_as(conv.weight)


#: exact conv type -> its weight transform (``None``: the weight itself)
WEIGHT_TRANSFORMS: dict[type, Optional[WeightTransform]] = {
    nn.Conv2d: None,
    StdConv2d: standardized_weight,
    ScaledStdConv2d: scaled_standardized_weight,
    Conv2dSame: None,
    StdConv2dSame: standardized_weight,
    ScaledStdConv2dSame: scaled_standardized_weight,
}

#: plain attributes (not parameters) a transform reads, copied onto the converted conv
_TRANSFORM_ATTRIBUTES = ("eps", "scale")


def weight_transform_of(conv: nn.Conv2d) -> Optional[WeightTransform]:
    """The transform of exactly ``type(conv)`` (a ``KeyError`` for types not in :data:`WEIGHT_TRANSFORMS`)."""
    return WEIGHT_TRANSFORMS[type(conv)]


def copy_transform_attributes(new: nn.Conv2d, old: nn.Conv2d) -> None:
    """Give the converted conv the transform and the plain attributes it reads (``eps``, ``scale``).

    Parameters (``weight``, ``gain``) are adopted with the module's state, keeping timm's names.
    """
    for attribute in _TRANSFORM_ATTRIBUTES:
        if hasattr(old, attribute):
            setattr(new, attribute, getattr(old, attribute))
    new.weight_transform = weight_transform_of(old)


def weight_for_forward(conv: nn.Conv2d) -> torch.Tensor:
    """The weight a converted conv computes with: its transform's output, or its own weight."""
    transform = getattr(conv, "weight_transform", None)
    return conv.weight if transform is None else transform(conv)
