"""timm's ResNets: the SparK encoder, and what backends need to know about their blocks.

Default drop-path rates are SparK's (``pretrain/models/__init__.py``); ResNet-18/34, which SparK
never pre-trained, use 0 (SparK's ``--dp`` default).
"""
from __future__ import annotations

from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ..backends import register_container
from ..backends.fused import register_bn_relu_pairs
from .timm_encoders import TimmEncoder, register_timm_encoder

__all__ = ["TimmResNetEncoder"]

# Their forward only calls children and adds: they run unchanged on every backend.
for _block in (Bottleneck, BasicBlock, ResNet):
    register_container(_block)

# BatchNorm -> ReLU pairs called back to back in timm's forward code (DropBlock between them must be
# off). Each ReLU output feeds a conv (or the stem's max-pool), so fusing them keeps only the BN input.
register_bn_relu_pairs(Bottleneck, ("bn1", "act1", ()), ("bn2", "act2", ("drop_block",)))
register_bn_relu_pairs(BasicBlock, ("bn1", "act1", ("drop_block",)))
register_bn_relu_pairs(ResNet, ("bn1", "act1", ()))


class TimmResNetEncoder(TimmEncoder):
    head_modules = ("global_pool", "fc")
    densify_norm = "bn"

    def forward(self, x, hierarchical: bool = True) -> list:
        m = self.model
        x = m.maxpool(m.act1(m.bn1(m.conv1(x))))
        features = []
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            x = layer(x)
            features.append(x)
        return features if hierarchical else features[-1]


for _name, _dp in {"resnet18": 0.0, "resnet34": 0.0, "resnet50": 0.05, "resnet101": 0.08,
                   "resnet152": 0.10, "resnet200": 0.15}.items():
    register_timm_encoder(_name, TimmResNetEncoder, _dp)
