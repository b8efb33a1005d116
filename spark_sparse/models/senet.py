"""timm's legacy SENets (``legacy_seresnet*``, ``legacy_seresnext*``, ``legacy_senet154``) on every backend.

The original SE-ResNet/ResNeXt code: bottlenecks and basic blocks whose branch ends in an ``SEModule``
before the residual add, and a ``layer0`` stem (with SENet-154's three-conv variant and a ceil-mode
max-pool that keeps the grid). The family's own ``SEModule`` is converted as timm's SE is
(:class:`~spark_sparse.backends.attention.ImageGate`): mean over each image's active sites,
``fc1 -> relu -> fc2 -> sigmoid`` on the squeezed vector, features times the gate. The rest is
composition, registered as containers.

No drop path (the legacy constructor takes none: a drop path is refused at creation, "pre-train it
with --dp 0"). Densify norm BatchNorm.
"""
from __future__ import annotations

import torch
from timm.models.senet import SEBottleneck, SEModule, SENet, SEResNetBlock, SEResNetBottleneck, SEResNeXtBottleneck

from ..backends import register_container, register_converter
from ..backends.attention import ImageGate
from .timm_encoders import register_timm_encoder

__all__ = ["FeatureLegacySEModule"]

for _composite in (SENet, SEBottleneck, SEResNetBottleneck, SEResNeXtBottleneck, SEResNetBlock):
    register_container(_composite)


class FeatureLegacySEModule(ImageGate):
    """The legacy SENet ``SEModule``: ``fc1 -> relu -> fc2 -> sigmoid`` on the active-site means."""

    def excite(self, squeezed: torch.Tensor) -> torch.Tensor:
        return self.sigmoid(self.fc2(self.relu(self.fc1(squeezed))))


register_converter(SEModule)(FeatureLegacySEModule.from_dense)
register_timm_encoder("legacy_seresnet18", 0.0, densify_norm="bn", tested=True)
