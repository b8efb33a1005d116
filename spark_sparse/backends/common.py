"""Layers that run the same way on every backend, written against :class:`FeatureMap`.

Only convolution and pooling differ between backends (dense-and-mask vs a sparse kernel). Norms,
activations, Linear/Mlp, DropPath, layer-scale and residual adds act on each active site's channel
vector, so they are written once here and every backend's converter table starts from
:data:`COMMON_CONVERTERS`. Each replacement adopts the original module's parameters and buffers
(the same ``nn.Parameter`` objects), so parameter names and state dicts stay timm's.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm, LayerNorm2d, RmsNorm
from timm.layers import activations as timm_act
from timm.layers.blur_pool import BlurPool2d
from timm.layers.fast_norm import rms_norm

from ..errors import SparkSparseError
from ..features import ChannelsLastView, FeatureMap, UnsupportedFeatureOperation
from ..kernels.base import int_pair
from ..timm_compat import optional_timm_part, present

# newer timm releases only (None before them)
RmsNorm2d = optional_timm_part("timm.layers", "RmsNorm2d")
SimpleNorm = optional_timm_part("timm.layers", "SimpleNorm")
SimpleNorm2d = optional_timm_part("timm.layers", "SimpleNorm2d")
simple_norm = optional_timm_part("timm.layers.fast_norm", "simple_norm")

__all__ = ["adopt_state", "adopt_module", "FeatureBatchNorm", "FeatureSyncBatchNorm", "FeatureLayerNorm", "FeatureChannelNorm",
           "FeatureLinear", "Elementwise", "LastDimensionLayer",
           "FeatureDropPath", "COMMON_CONVERTERS", "ZERO_PRESERVING_ACTIVATIONS", "TooFewSitesError", "check_output_grid"]


def adopt_state(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give ``new`` the very parameter and buffer objects of ``old`` (no copy), and its train flag. Buffers
    ``old`` keeps out of its state dict (``persistent=False``: Swin's relative position index) stay out."""
    for name, param in old._parameters.items():
        new._parameters[name] = param
    for name, buf in old._buffers.items():
        new._buffers[name] = buf
    new._non_persistent_buffers_set.update(old._non_persistent_buffers_set)
    new.train(old.training)
    return new


def adopt_module(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give ``new`` the very children of ``old`` too, as :func:`adopt_state` its parameters and buffers: a
    converter that rewrites a module's forward keeps its children, names and state dict."""
    new._modules.update(old._modules)
    return adopt_state(new, old)


class TooFewSitesError(SparkSparseError, ValueError):
    """A layer's statistics over the active sites need more of them than the batch and mask leave."""


class FeatureBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose batch statistics (and running statistics) come from active sites only.

    This is SparK's ``SparseBatchNorm2d``: gather the active sites to ``[N, C]`` and normalise them
    as BatchNorm1d would. Parameter names are BatchNorm2d's.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 2:
            raise ValueError(f"expected active rows [N, C], got shape {tuple(input.shape)}")

    def forward(self, x: FeatureMap) -> FeatureMap:
        return x.with_active_rows(super().forward(self.rows_with_statistics(x)))

    def rows_with_statistics(self, x: FeatureMap) -> torch.Tensor:
        """The active rows, refused where training-mode statistics cannot be taken over them (one site in the
        whole batch: torch's own error names neither the reason nor a way out)."""
        rows = x.active_rows()
        if self.training and rows.shape[0] == 1:
            raise TooFewSitesError(f"BatchNorm ({self.num_features} channels, stride {x.stride}) in training mode got "
                                   f"one visible site in the whole batch: batch statistics need two or more (SparK's "
                                   f"SparseBatchNorm2d fails alike); use a larger batch or a lower mask ratio, or eval()")
        return rows

    @classmethod
    def from_dense(cls, backend, bn: nn.modules.batchnorm._BatchNorm, name: str = "") -> "FeatureBatchNorm":
        new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  track_running_stats=bn.track_running_stats)
        return adopt_state(new, bn)


class FeatureSyncBatchNorm(nn.SyncBatchNorm):
    """:class:`FeatureBatchNorm` with statistics synchronised across processes (SparK's ``--sbn``)."""

    def forward(self, x: FeatureMap) -> FeatureMap:
        return x.with_active_rows(super().forward(x.active_rows()))

    @classmethod
    def from_dense(cls, backend, bn: nn.modules.batchnorm._BatchNorm, name: str = "") -> "FeatureSyncBatchNorm":
        new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  track_running_stats=bn.track_running_stats)
        return adopt_state(new, bn)


#: timm's norms over dimension 1 of an NCHW tensor (the others normalise its last dimension)
CHANNELS_FIRST_NORMS = present(LayerNorm2d, RmsNorm2d, SimpleNorm2d)


def refuse_channels_last_view(x: object, layer: str) -> None:
    """A channels-first norm given a channels-last view (``x.permute(0, 2, 3, 1)``) would normalise the
    width of the dense model's NHWC tensor, not its channels: refused."""
    if isinstance(x, ChannelsLastView):
        raise UnsupportedFeatureOperation(
            f"{layer} normalises dimension 1 of an NCHW tensor, but it was given a channels-last view "
            f"(x.permute(0, 2, 3, 1)), whose dimension 1 is the height in the dense model")


class LastDimensionLayer:
    """Mixin of the layers over the last dimension (channels-last LayerNorm, RMS norms, Linear, GRN, GRN-MLP).

    In the dense model such a layer given an NCHW map acts on its width (or fails on a size mismatch).
    This package's converters pass maps to these layers where the dense model holds the same sites
    channels last (their tests compare them with timm's dense layers); under a user's own forward, the
    backend sets ``refuses_channels_first_maps`` and only a channels-last view
    (``x.permute(0, 2, 3, 1)``) is taken: an NCHW map is refused, never silently normalised per site.
    """

    refuses_channels_first_maps: bool = False

    def check_layout(self, x: object, layer: str) -> None:
        if self.refuses_channels_first_maps:
            refuse_channels_first_map(x, layer)


def refuse_channels_first_map(x: object, layer: str) -> None:
    """Refuse an NCHW feature map given to a layer over the last dimension (see :class:`LastDimensionLayer`)."""
    if isinstance(x, FeatureMap):
        raise UnsupportedFeatureOperation(
            f"{layer} acts on the last dimension, but it was given a channels-first (NCHW) feature map, whose "
            f"last dimension is the width in the dense model; permute to channels last first "
            f"(x.permute(0, 2, 3, 1)) as a channels-last block does")


class FeatureLayerNorm(LastDimensionLayer, nn.LayerNorm):
    """LayerNorm over the channels of each active site (timm's ``LayerNorm`` and ``LayerNorm2d``).

    ``channels_first`` (``LayerNorm2d``) refuses a channels-last view; a channels-last LayerNorm
    takes a view, or a map from this package's converters (:class:`LastDimensionLayer`)."""

    channels_first: bool = False

    def forward(self, x: FeatureMap) -> FeatureMap:
        if self.channels_first:
            refuse_channels_last_view(x, "LayerNorm2d")
        else:
            self.check_layout(x, "LayerNorm")
        return x.per_site(lambda v: F.layer_norm(v, self.normalized_shape, self.weight, self.bias, self.eps))

    @classmethod
    def from_dense(cls, backend, ln: nn.LayerNorm, name: str = "") -> "FeatureLayerNorm":
        new = cls(ln.normalized_shape, eps=ln.eps, elementwise_affine=ln.elementwise_affine,
                  bias=ln.bias is not None)
        new.channels_first = isinstance(ln, CHANNELS_FIRST_NORMS)
        return adopt_state(new, ln)


class FeatureChannelNorm(LastDimensionLayer, nn.Module):
    """timm's RMS norms (``RmsNorm``, ``RmsNorm2d``) and ``SimpleNorm`` layers over the channels of each active
    site, through timm's own channels-last function (the 2d layers compute the same over ``dim=1``)."""

    def __init__(self, normalized_shape: tuple[int, ...], eps: float,
                 function: Callable[..., torch.Tensor], channels_first: bool = False):
        super().__init__()
        self.normalized_shape, self.eps, self.function = tuple(normalized_shape), eps, function
        self.channels_first = channels_first

    def forward(self, x: FeatureMap) -> FeatureMap:
        if self.channels_first:
            refuse_channels_last_view(x, self.function.__name__)
        else:
            self.check_layout(x, self.function.__name__)
        return x.per_site(lambda v: self.function(v, self.normalized_shape, self.weight, self.eps))

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, {self.function.__name__}"

    @classmethod
    def converter(cls, function: Callable[..., torch.Tensor]) -> Callable:
        """The converter of a timm norm whose per-site maths is ``function(x, shape, weight, eps)``."""
        def convert(backend, norm: nn.Module, name: str = "") -> "FeatureChannelNorm":
            return adopt_state(cls(norm.normalized_shape, norm.eps, function,
                                   channels_first=isinstance(norm, CHANNELS_FIRST_NORMS)), norm)
        return convert


class FeatureLinear(LastDimensionLayer, nn.Linear):
    """A Linear layer applied to each active site's channel vector (channels-last layers)."""

    def forward(self, x: FeatureMap) -> FeatureMap:
        self.check_layout(x, "Linear")
        return x.per_site(lambda v: F.linear(v, self.weight, self.bias))

    @classmethod
    def from_dense(cls, backend, linear: nn.Linear, name: str = "") -> "FeatureLinear":
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        return adopt_state(new, linear)


class Elementwise(nn.Module):
    """Apply a zero-preserving elementwise module to the feature values, keeping its state names."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: FeatureMap) -> FeatureMap:
        return x.elementwise(self.fn)


#: f(0) == 0, so applying them to masked zeros keeps them zero (SparK relies on this too); no state
#: (``Elementwise`` wraps the module, so a parameter would change its state-dict name). timm's own
#: classes are listed beside torch's: ``create_act_layer`` returns them (``gelu`` -> timm's GELU).
#: Sigmoid / hard-sigmoid (f(0) = 0.5) are not here: timm uses them as the gates of squeeze-excitation,
#: which :mod:`.attention` converts as a whole; on features they would fill masked sites.
ZERO_PRESERVING_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Hardswish, nn.Mish,
                               nn.Tanh, nn.ELU, nn.CELU, nn.SELU, nn.Dropout,
                               timm_act.GELU, timm_act.GELUTanh, timm_act.QuickGELU, timm_act.Swish, timm_act.Mish,
                               timm_act.HardSwish, timm_act.HardMish, timm_act.Tanh)


class FeatureDropPath(DropPath):
    """timm's per-sample DropPath on a feature map; draws its factors like timm does."""

    def forward(self, x: FeatureMap) -> FeatureMap:
        return x.drop_path(self.drop_prob, self.training, self.scale_by_keep)

    @classmethod
    def from_dense(cls, backend, dp: DropPath, name: str = "") -> "FeatureDropPath":
        return adopt_state(cls(dp.drop_prob, dp.scale_by_keep), dp)


def _elementwise(backend, module, name):
    return Elementwise(module)


def _output_size(size: int, kernel: int, stride: int, before: int, after: int, dilation: int, ceil_mode: bool) -> int:
    """``nn.Conv2d`` / ``nn.MaxPool2d`` / ``nn.AvgPool2d`` output length of ``size`` sites padded by
    ``before`` and ``after`` (incl. ceil mode's last-window rule)."""
    span = size + before + after - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + before:
        out -= 1
    return out


def check_output_grid(module: nn.Module, name: str, padding=None, kernel_size=None) -> None:
    """Refuse a conv or pool whose output is not its input grid downsampled by its stride.

    SparK's mask at the output stride (and every sparse kernel's output rows) is the input's mask
    downsampled by the stride, so a map of ``m * stride`` sites must give ``m`` outputs for every
    ``m`` (``ceil_mode`` is accepted where it changes nothing, e.g. ResNet-D's 2x2/2 average pool).
    ``padding`` overrides the module's own (for layers that pad explicitly): an int or a pair pads both
    sides of an axis alike, four values are ``F.pad``'s ``(left, right, top, bottom)``; ``kernel_size``
    likewise, for modules that name theirs otherwise (BlurPool's ``filt_size``).
    """
    kernel = int_pair(module.kernel_size if kernel_size is None else kernel_size)
    stride = int_pair(module.stride)
    pad = module.padding if padding is None else padding
    if isinstance(pad, (tuple, list)) and len(pad) == 4:
        sides = ((pad[2], pad[3]), (pad[0], pad[1]))        # (before, after) along height, then width
    else:
        sides = tuple((p, p) for p in int_pair(pad))
    dilation = int_pair(getattr(module, "dilation", 1))
    ceil_mode = getattr(module, "ceil_mode", False)
    for axis in range(2):
        sizes = {m: _output_size(m * stride[axis], kernel[axis], stride[axis], *sides[axis], dilation[axis], ceil_mode)
                 for m in (1, 2, 3, 7)}
        if any(out != m for m, out in sizes.items()):
            raise NotImplementedError(
                f"{name}: {type(module).__name__}(kernel={kernel}, stride={stride}, padding={pad}, dilation={dilation}, "
                f"ceil_mode={ceil_mode}) maps {stride[axis] * 7} sites to {sizes[7]}, not {7}: its output is not the "
                f"input grid downsampled by the stride, which SparK's masks (and sparse backends) need; use "
                f"padding=(kernel-1)//2*dilation for odd kernels, kernel == stride with padding 0 for even ones")


#: timm ``BlurPool2d``'s ``pad_mode`` -> the neighbour table's padding mode for the same taps
BLUR_PAD_MODES = {"reflect": "reflect", "constant": "zeros"}


def check_blur_pool(pool: BlurPool2d, name: str) -> None:
    """Refuse a BlurPool that backends cannot reproduce.

    The binomial filter is a fixed depthwise conv; SparK's rule makes it one more conv on the masked
    map (masked sites read 0, the output is masked), and its padding (reflected at the image border,
    or zeros for timm's ``blurpc``) is a map border, which a table reproduces.
    """
    if pool.pad_mode not in BLUR_PAD_MODES:
        raise NotImplementedError(f"{name}: BlurPool2d pad_mode={pool.pad_mode!r}; backends reproduce "
                                  f"{' and '.join(map(repr, BLUR_PAD_MODES))}")
    check_output_grid(pool, name, padding=pool.padding, kernel_size=pool.filt_size)


class ConvertedBlurPool2d(BlurPool2d):
    """Base of the backends' blur pools: built from timm's (refusing what :func:`check_blur_pool` refuses), with
    its filter as the same non-persistent buffer."""

    @classmethod
    def from_dense(cls, backend, pool: BlurPool2d, name: str = "") -> "ConvertedBlurPool2d":
        check_blur_pool(pool, name)
        return adopt_state(cls(pool.channels, pool.filt_size, pool.stride, pool.pad_mode), pool)


COMMON_CONVERTERS: dict = {
    nn.BatchNorm2d: FeatureBatchNorm.from_dense,
    nn.SyncBatchNorm: FeatureSyncBatchNorm.from_dense,
    # timm's LayerNorm (channels last) and LayerNorm2d (channels first) normalise each site's channels too
    nn.LayerNorm: FeatureLayerNorm.from_dense,
    LayerNorm: FeatureLayerNorm.from_dense,
    LayerNorm2d: FeatureLayerNorm.from_dense,
    # RMS norms (ConvNeXt's *_rms variants): per site as well (the classes this timm has)
    **{norm: FeatureChannelNorm.converter(function)
       for norm, function in ((RmsNorm, rms_norm), (RmsNorm2d, rms_norm), (SimpleNorm, simple_norm),
                              (SimpleNorm2d, simple_norm)) if norm is not None},
    nn.Linear: FeatureLinear.from_dense,
    DropPath: FeatureDropPath.from_dense,
    nn.Identity: lambda backend, module, name: module,
    **{act: _elementwise for act in ZERO_PRESERVING_ACTIVATIONS},
}
