"""Channel attention on active sites: squeeze-excitation and ECA, squeezing over ACTIVE sites only.

timm's SE-style layers compute ``x * gate(excite(mean over H, W of x))``. On a masked image the
mean must run over each image's active sites (SparK issue 54): averaging the zeros of masked
patches in would scale every image's squeeze by its visible fraction. So every layer here

1. squeezes: ``s[b, c]`` = mean of ``x[b, c]`` over image ``b``'s active sites (:func:`.per_image.image_means`);
2. excites with the layer's own modules, unchanged, on the dense ``[B, C, 1, 1]`` (or ``[B, 1, C]``
   for ECA) tensor: the same parameters, names and maths as timm;
3. gates: ``x * gate[b, c]``. Features are only multiplied, so masked sites stay exactly zero
   whatever the gate's value at zero (sigmoid, hard-sigmoid).

:class:`ImageGate` is the shared part; a family with its own SE class (EfficientNet's
``SqueezeExcite``, in :mod:`spark_sparse.models.efficientnet`) subclasses it and writes ``excite``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import EcaModule, EffectiveSEModule, GlobalContext, SEModule

from ..features import FeatureMap
from .base import UnsupportedModuleError, register_converter
from .common import adopt_module, adopt_state
from .per_image import image_means, image_softmax, image_sums, per_site_values, scale_per_image

__all__ = ["ImageGate", "FeatureSEModule", "FeatureEffectiveSEModule", "FeatureEcaModule", "FeatureGlobalContext"]


class ImageGate(nn.Module):
    """Base of channel attention on a feature map: squeeze over active sites, excite, gate.

    Subclasses implement :meth:`excite` with the children they adopted from the dense module (same
    names, so state dicts stay timm's).
    """

    def excite(self, squeezed: torch.Tensor) -> torch.Tensor:
        """``[B, C, 1, 1]`` active-site means -> ``[B, C, 1, 1]`` (or any ``B * C``-sized) gate."""
        raise NotImplementedError

    def forward(self, x: FeatureMap) -> FeatureMap:
        batch, channels = x.mask.batch_size, x.channels
        gate = self.excite(image_means(x).view(batch, channels, 1, 1))
        return scale_per_image(x, gate.reshape(batch, channels))

    @classmethod
    def from_dense(cls, backend, module: nn.Module, name: str = "") -> "ImageGate":
        """A gate holding ``module``'s very children, parameters and buffers (no copy)."""
        if getattr(module, "add_maxpool", False):
            raise UnsupportedModuleError(
                f"backend {backend.name!r} cannot convert {name!r} ({type(module).__name__} with add_maxpool=True): "
                f"timm's experimental max-pool squeeze is not supported; build the model with add_maxpool=False")
        return adopt_module(cls(), module)


class FeatureSEModule(ImageGate):
    """timm's ``SEModule`` (SE-ResNet, RegNetY): ``fc1 -> bn -> act -> fc2 -> gate``."""

    def excite(self, squeezed: torch.Tensor) -> torch.Tensor:
        return self.gate(self.fc2(self.act(self.bn(self.fc1(squeezed)))))


class FeatureEffectiveSEModule(ImageGate):
    """timm's ``EffectiveSEModule`` (VoVNet-V2 eSE): ``fc -> gate``."""

    def excite(self, squeezed: torch.Tensor) -> torch.Tensor:
        return self.gate(self.fc(squeezed))


class FeatureEcaModule(ImageGate):
    """timm's ``EcaModule`` (ECA-ResNet): a 1-D conv across the channels of the squeezed vector."""

    def excite(self, squeezed: torch.Tensor) -> torch.Tensor:
        y = self.conv(squeezed.view(squeezed.shape[0], 1, -1))
        second = getattr(self, "conv2", None)          # timm's experimental MLP mode (use_mlp=True)
        if second is not None:
            y = second(self.act(y))
        return self.gate(y)


register_converter(SEModule)(FeatureSEModule.from_dense)
register_converter(EffectiveSEModule)(FeatureEffectiveSEModule.from_dense)
register_converter(EcaModule)(FeatureEcaModule.from_dense)


class FeatureGlobalContext(nn.Module):
    """timm's ``GlobalContext`` (GCNet; GC-ResNet, GC-ResNeXt) over each image's active sites.

    Context: with attention, the softmax of the module's ``conv_attn`` logit runs over the image's
    active sites (:func:`.per_image.image_softmax`) and weights their features; without, the mean over
    them (as SE's squeeze). The module's own ``mlp_scale`` / ``mlp_add`` (1x1-conv MLPs with LayerNorm)
    run unchanged on that ``[B, C, 1, 1]`` context: the scale branch gates the features like SE, the add
    branch adds its per-image vector at active sites only (masked sites stay 0).
    """

    def forward(self, x: FeatureMap) -> FeatureMap:
        batch, channels = x.mask.batch_size, x.channels
        if self.conv_attn is not None:
            weight = self.conv_attn.weight.reshape(1, channels)
            logits = x.per_site(lambda values: F.linear(values, weight, self.conv_attn.bias)).data
            context = image_sums(x, x.data * image_softmax(x, logits).to(x.data.dtype))
        else:
            context = image_means(x)
        context = context.view(batch, channels, 1, 1)
        if self.mlp_scale is not None:
            x = scale_per_image(x, self.gate(self.mlp_scale(context)).reshape(batch, channels))
        if self.mlp_add is not None:
            added = self.mlp_add(context).reshape(batch, channels).to(x.data.dtype)
            x = x.with_data(x.data + per_site_values(x, added))
        return x

    @classmethod
    def from_dense(cls, backend, module: GlobalContext, name: str = "") -> "FeatureGlobalContext":
        """A module holding ``module``'s very children (``conv_attn``, the MLPs, ``gate``): same names.
        An option timm built without is a plain ``None`` attribute there, and here."""
        new = cls()
        for name in ("conv_attn", "mlp_add", "mlp_scale", "gate"):
            setattr(new, name, getattr(module, name))
        return adopt_state(new, module)


register_converter(GlobalContext)(FeatureGlobalContext.from_dense)
