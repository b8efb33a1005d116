"""SparK's light UNet decoder, unchanged in maths and initialisation."""
from __future__ import annotations

import contextlib
import math
import operator

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError

__all__ = ["UNetBlock", "LightDecoder", "SPARK_DECODER_WIDTH", "check_decoder_width", "decoder_width_rule"]

#: SparK's decoder: 768 channels at the coarsest level, halved at each upsampling block
SPARK_DECODER_WIDTH = 768


@contextlib.contextmanager
def _frozen_norm_statistics(module: nn.Module):
    """Restore BatchNorm running statistics after a checkpoint's recomputation updated them again."""
    saved = [(bn, bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
             for bn in module.modules() if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats]
    try:
        yield
    finally:
        for bn, mean, var, count in saved:
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.num_batches_tracked.copy_(count)


class UNetBlock(nn.Module):
    """2x upsampling: ConvTranspose(k4, s2, p1) -> Conv3x3 -> BN -> ReLU6 -> Conv3x3 -> BN."""

    def __init__(self, cin: int, cout: int, norm_layer: type[nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self.up_sample = nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cin, kernel_size=3, stride=1, padding=1, bias=False), norm_layer(cin), nn.ReLU6(inplace=True),
            nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=False), norm_layer(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up_sample(x))


def _levels(up_sample_ratio: int) -> int:
    """How many UNet blocks (each doubling the resolution, halving the width) cover ``up_sample_ratio``."""
    return round(math.log2(up_sample_ratio))


def decoder_width_rule(up_sample_ratio: int) -> str:
    """What a decoder width must be, in the words every refusal of one uses (the decoder's, the CLI's, the
    benchmarks')."""
    levels = _levels(up_sample_ratio)
    return (f"an int of at least {2 ** levels}, as it is halved at each of the decoder's {levels} levels "
            f"(SparK: {SPARK_DECODER_WIDTH})")


def check_decoder_width(up_sample_ratio: int, width: object) -> int:
    """``width`` as an int, refused unless each of the decoder's ``log2(up_sample_ratio)`` halvings leaves a channel."""
    try:
        value = None if isinstance(width, bool) else operator.index(width)
    except TypeError:
        value = None
    if value is None or value < 2 ** _levels(up_sample_ratio):
        raise ConfigError(f"decoder width {width!r}: {decoder_width_rule(up_sample_ratio)}")
    return value


class LightDecoder(nn.Module):
    """``log2(up_sample_ratio)`` UNet blocks of width ``width`` halving per level, then a 1x1 to RGB.

    ``forward(to_dec)`` takes the densified maps coarsest first; each is added before the block of
    its resolution.
    """

    def __init__(self, up_sample_ratio: int, width: int = SPARK_DECODER_WIDTH, sync_bn: bool = False):
        super().__init__()
        n = _levels(up_sample_ratio)
        if 2 ** n != up_sample_ratio:
            raise ValueError(f"decoder up-sample ratio must be a power of 2, got {up_sample_ratio}")
        width = check_decoder_width(up_sample_ratio, width)
        self.width = width
        channels = [width // 2 ** i for i in range(n + 1)]
        norm_layer = nn.SyncBatchNorm if sync_bn else nn.BatchNorm2d
        self.dec = nn.ModuleList([UNetBlock(cin, cout, norm_layer) for cin, cout in zip(channels[:-1], channels[1:])])
        self.proj = nn.Conv2d(channels[-1], 3, kernel_size=1, stride=1, bias=True)
        self.grad_checkpointing = False
        self.initialize()

    def forward(self, to_dec: list) -> torch.Tensor:
        x = 0
        for i, block in enumerate(self.dec):
            if i < len(to_dec) and to_dec[i] is not None:
                x = x + to_dec[i]
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False,
                               context_fn=lambda b=block: (contextlib.nullcontext(), _frozen_norm_statistics(b)))
            else:
                x = block(x)
        return self.proj(x)

    def initialize(self) -> None:
        """SparK's init: trunc-normal(.02) for Conv2d, Kaiming fan-out for ConvTranspose2d, BN = (1, 0).

        (In SparK the Kaiming branch is reached only by ConvTranspose2d, which is not a Conv2d.)
        """
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.0)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)):
                nn.init.constant_(m.bias, 0)
                nn.init.constant_(m.weight, 1.0)

    def extra_repr(self) -> str:
        return f"width={self.width}"
