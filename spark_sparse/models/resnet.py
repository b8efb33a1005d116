"""timm's ResNets (incl. ResNet-D, SE-ResNet, ResNeXt, ECA-ResNet): their blocks on every backend.

Default drop-path rates are SparK's (``pretrain/models/__init__.py``); ResNet-18/34, which SparK
never pre-trained, use 0 (SparK's ``--dp`` default); the ResNet-50-sized variants (``resnet50d``,
``seresnet50``, ``resnext50_32x4d``, ``resnetblur50``) use ResNet-50's 0.05. SparK densifies ResNet features with
BatchNorm.

Layers these variants add, all handled by :mod:`spark_sparse.backends`: ResNet-D's deep stem (plain
convs) and its ``AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)`` shortcut, the SE module
(squeeze over active sites, :mod:`~spark_sparse.backends.attention`), ECA, ResNeXt's grouped
3x3 convs, and the anti-aliased ResNets' ``BlurPool2d`` (``resnetblur*``: a fixed binomial depthwise
filter before each stride, with reflect padding).
"""
from __future__ import annotations

from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ..backends import register_container
from ..backends.fused import register_bn_relu_pairs
from .timm_encoders import register_timm_encoder

__all__ = []

# Their forward only calls children and adds: they run unchanged on every backend.
for _block in (Bottleneck, BasicBlock, ResNet):
    register_container(_block)

# BatchNorm -> ReLU pairs called back to back in timm's forward code (DropBlock between them must be
# off). Each ReLU output feeds a conv (or the stem's max-pool), so fusing them keeps only the BN input.
register_bn_relu_pairs(Bottleneck, ("bn1", "act1", ()), ("bn2", "act2", ("drop_block",)))
register_bn_relu_pairs(BasicBlock, ("bn1", "act1", ("drop_block",)))
register_bn_relu_pairs(ResNet, ("bn1", "act1", ()))

#: name -> (SparK default drop path, checked by the test suite on every backend)
_RESNETS = {"resnet18": (0.0, True), "resnet34": (0.0, False), "resnet50": (0.05, True), "resnet101": (0.08, False),
            "resnet152": (0.10, False), "resnet200": (0.15, False),
            "resnet50d": (0.05, True), "seresnet50": (0.05, True), "resnext50_32x4d": (0.05, True),
            "resnetblur50": (0.05, True)}
for _name, (_dp, _tested) in _RESNETS.items():
    register_timm_encoder(_name, _dp, densify_norm="bn", tested=_tested)
