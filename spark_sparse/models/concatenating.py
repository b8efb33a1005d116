"""timm's CNNs that join channel groups (DenseNet, VoVNet, Res2Net, GhostNet, ReXNet, SelecSLS, RepGhost;
DPN, FasterNet and RDNet, which do too, are in ``dpn``, ``fasternet`` and ``rdnet``).

Their blocks join channel groups with ``torch.cat(..., 1)`` (Res2Net splits them with
``torch.split(x, width, 1)``, GhostNet keeps the first channels with ``out[:, :out_chs]``, ReXNet
adds its shortcut to the first channels only: ``cat([x[:, :c] + shortcut, x[:, c:]], 1)``, SelecSLS
passes ``[features, skip]`` lists between blocks and concatenates both into each block's output;
RepGhost, GhostNet's successor, adds BatchNorm'd copies instead): every group holds the same active
sites, so these are exact on every backend (:class:`~spark_sparse.features.FeatureMap`). The rest is
layers the backends convert: BatchNorm (+ activation), convs, VoVNet's ``ConvNormAct``, eSE and
GhostNet's and ReXNet's SE attention (squeeze over active sites; ReXNet's has a BatchNorm on the
squeezed vector, timm's own), pools (DenseNet's 2x2 average transition, VoVNet's ceil-mode 3x3
max-pool, Res2Net's 3x3 average pool of the last group in each stage's first block, padding counted
as SparK's dense pool counts it).

Options without an exact meaning on active sites are refused: DenseNet's ``proj_drop_rate``
(``F.dropout`` inside its layers) fails on the first training forward naming the torch function
(:class:`~spark_sparse.features.UnsupportedFeatureOperation`); a drop path for a net that has none
(DenseNet, GhostNet, SelecSLS, RepGhost) fails at creation. DenseNet's anti-aliased transition
(``densenetblur121d``) is timm's blur pool, which the backends convert.

GhostNet-V2 and V3 are not registered (their DFC attention resizes features with
``F.interpolate``): they fail at conversion, naming the module.

Default drop path 0 (SparK's ``--dp`` default; DenseNet, GhostNet, SelecSLS and RepGhost take none),
densify norm BatchNorm.
"""
from __future__ import annotations

from timm.models.densenet import DenseBlock, DenseLayer, DenseNet, DenseTransition
from timm.models.ghostnet import GhostBottleneck, GhostModule, GhostNet
from timm.models.res2net import Bottle2neck
from timm.models.repghost import RepGhostBottleneck, RepGhostModule, RepGhostNet
from timm.models.rexnet import LinearBottleneck, RexNet
from timm.models.selecsls import SelecSls, SelecSlsBlock, SelectSeq, SequentialList
from timm.models.vovnet import OsaBlock, OsaStage, SequentialAppendList, VovNet

from ..backends import register_container
from .timm_encoders import register_timm_encoder

__all__ = []

for _composite in (DenseNet, DenseBlock, DenseLayer, DenseTransition, VovNet, OsaStage, OsaBlock,
                   SequentialAppendList, Bottle2neck, GhostNet, GhostBottleneck, GhostModule, RexNet, LinearBottleneck,
                   SelecSls, SelecSlsBlock, SequentialList, SelectSeq, RepGhostNet, RepGhostBottleneck, RepGhostModule):
    register_container(_composite)

for _name in ("densenet121", "ese_vovnet39b", "res2net50_26w_4s", "ghostnet_100", "rexnet_100", "selecsls42b",
              "repghostnet_100"):
    register_timm_encoder(_name, 0.0, densify_norm="bn", tested=True)
