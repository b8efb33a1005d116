"""What every true-sparse backend shares: ``[N, C]`` rows of active sites, convs run on kernels.

A :class:`RowBackend` is a priority list of kernel names from the :mod:`spark_sparse.kernels`
registry. Each converted convolution resolves, for the device and dtype it meets, the first kernel
that supports it (xformers-style dispatch) and remembers the choice; ``strict`` turns any fallback
from the first kernel into an error. Pooling is computed here by a gather over the mask's neighbour
table (exactly SparK's dense pooling of the masked map, restricted to active sites).
"""
from __future__ import annotations

from typing import Callable, ClassVar, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import SpaceToDepth
from timm.layers.blur_pool import BlurPool2d

from ..kernels import ConvCall, ConvSpec, check_kernel_names, list_kernels, select_kernel
from ..kernels.base import int_pair
from ..kernels.gather import rows_at, table_taps

from ..features import SparseRows
from .base import Backend
from .common import BLUR_PAD_MODES, COMMON_CONVERTERS, ConvertedBlurPool2d, adopt_state, check_output_grid
from .conv_weights import WEIGHT_TRANSFORMS, copy_transform_attributes, weight_for_forward
from .fused import saved_as_recipe
from .pools import ConstantPadMaxPool2d
from .same_padding import grid_padding, pads_same
from .space_to_depth import SparseSpaceToDepth
from .upsample import SparseNearestUpsample

__all__ = ["RowBackend", "SparseConv2d", "SparseMaxPool2d", "SparseConstantPadMaxPool2d", "SparseAvgPool2d",
           "SparseBlurPool2d"]


def _square(value, what: str, name: str) -> int:
    pair = int_pair(value)
    if pair[0] != pair[1]:
        raise NotImplementedError(f"{name}: non-square {what} {pair} is not supported by sparse backends")
    return pair[0]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a conv should run in: autocast's when it is on for this device, else the input's.

    As for ``F.conv2d``, autocast leaves float64 inputs in float64 (it casts lower-precision-eligible
    floats only)."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class SparseConv2d(nn.Conv2d):
    """A Conv2d (timm's parameters, dense layout) computed on active rows by a dispatched kernel.

    Weight-standardised convs (timm's ``StdConv2d``, ``ScaledStdConv2d``) convert to this class with
    their weight transform (see :mod:`.conv_weights`): the kernel receives the transformed weight.
    ``padding`` is the LEADING padding (kernels read it so, the output grid being the input's
    downsampled by the stride): a TensorFlow-"SAME" conv converts with its leading part
    (:func:`~.same_padding.grid_padding`).
    """

    weight_transform = None

    def weight_for_forward(self) -> torch.Tensor:
        """The weight the kernel computes with (standardised for ``StdConv2d`` and friends)."""
        return weight_for_forward(self)

    def configure(self, name: str, policy: Callable[[ConvSpec], Sequence[str]], strict: bool,
                  policy_limits_candidates: bool = False) -> "SparseConv2d":
        """``policy(spec)``: the kernel names to try for this layer on a device and dtype, best first.

        ``policy_limits_candidates``: measured dispatch chooses among ``policy``'s kernels only, not among every
        registered one (the user named the kernels the backend may use).
        """
        self.layer_name, self.kernel_policy, self.strict = name, policy, strict
        self.policy_limits_candidates = policy_limits_candidates
        self.stride_factor = _square(self.stride, "stride", name)
        self._chosen: dict[tuple[str, torch.dtype], object] = {}
        #: (device type, dtype) -> kernel name that overrides the policy (set by autotuning)
        self._pinned: dict[tuple[str, torch.dtype], str] = {}
        return self

    def pin_kernel(self, device_type: str, dtype: torch.dtype, kernel: Optional[str]) -> None:
        """Run this layer on ``kernel`` whenever it computes on ``device_type`` in ``dtype``.

        Measured dispatch (the ``auto`` backend) pins the kernel it timed fastest on the layer's real
        shapes; ``None`` returns the layer to its backend's policy. A kernel that cannot run the layer
        is refused with its reasons.
        """
        key = (torch.device(device_type).type, dtype)
        self._chosen.pop(key, None)
        if kernel is None:
            self._pinned.pop(key, None)
            return
        select_kernel(ConvSpec.of(self, key[0], dtype), (kernel,), self.layer_name, strict=True)
        self._pinned[key] = kernel

    def pinned_kernel(self, device_type: str, dtype: torch.dtype) -> Optional[str]:
        return self._pinned.get((torch.device(device_type).type, dtype))

    def candidate_kernels(self, device_type: str, dtype: torch.dtype, reproducible_only: bool = False) -> list[str]:
        """Every registered kernel (or, when the policy limits candidates, every kernel of the policy) that
        declares it can run this layer on ``device_type`` in ``dtype`` (and, with ``reproducible_only``, that
        declares bit-reproducible results there)."""
        spec = ConvSpec.of(self, device_type, dtype)
        registered = list_kernels()
        names = dict.fromkeys(self.kernel_policy(spec)) if self.policy_limits_candidates else registered
        return [name for name in names if name in registered and not registered[name].not_supported_reasons(spec)
                and (not reproducible_only or spec.device_type in registered[name].REPRODUCIBLE_ON)]

    def conv_call(self, mask, in_stride: int) -> ConvCall:
        """Where this layer computes for input rows at ``in_stride`` of ``mask``."""
        return ConvCall(mask, in_stride, in_stride * self.stride_factor, tuple(self.kernel_size), tuple(self.padding),
                        tuple(self.dilation), self.groups)

    def _select(self, device, dtype):
        spec = ConvSpec.of(self, device, dtype)
        pinned = self._pinned.get((spec.device_type, dtype))
        priority = (pinned,) if pinned is not None else self.kernel_policy(spec)
        return spec, *select_kernel(spec, priority, self.layer_name, self.strict)

    def kernel_for(self, device: torch.device, dtype: torch.dtype):
        key = (torch.device(device).type, dtype)
        if key not in self._chosen:
            self._chosen[key] = self._select(device, dtype)[1]
        return self._chosen[key]

    def forward(self, x: SparseRows) -> SparseRows:
        dtype = _compute_dtype(x.data)
        kernel = self.kernel_for(x.data.device, dtype)
        call = self.conv_call(x.mask, x.stride)
        bias = None if self.bias is None else self.bias.to(dtype)
        with saved_as_recipe(x):
            out = kernel.conv(x.data.to(dtype), self.weight_for_forward().to(dtype), bias, call)
        expected = (x.mask.num_active(call.out_stride), self.out_channels)     # cached by the mask: no device sync
        if tuple(out.shape) != expected:       # a plug-in's bug, named here rather than by a later layer's shapes
            raise RuntimeError(f"kernel {kernel.NAME!r} returned rows of shape {tuple(out.shape)} for layer "
                               f"{self.layer_name}, which needs {expected} (the active sites at stride "
                               f"{call.out_stride} x the output channels)")
        return SparseRows(out, x.mask, call.out_stride)

    def describe_execution(self, device, dtype) -> str:
        spec, kernel, rejected = self._select(device, dtype)
        skipped = "".join(f"; skipped {name}: {', '.join(reasons)}" for name, reasons in rejected.items())
        pinned = " (pinned)" if self.pinned_kernel(spec.device_type, dtype) is not None else ""
        return f"{kernel.NAME:<10} {spec.describe()}{pinned}{skipped}"

    @classmethod
    def from_dense(cls, backend: "RowBackend", conv: nn.Conv2d, name: str) -> "SparseConv2d":
        if conv.padding_mode != "zeros":
            raise NotImplementedError(f"{name}: padding_mode={conv.padding_mode!r}; sparse backends pad with zeros")
        if isinstance(conv.padding, str):
            raise NotImplementedError(f"{name}: string padding {conv.padding!r} is not supported")
        if not pads_same(conv):             # SAME padding keeps the grid of m * stride sites by definition
            check_output_grid(conv, name)
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                  padding=grid_padding(conv), dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)
        copy_transform_attributes(new, conv)
        return adopt_state(new, conv).configure(name, backend.kernels_for, backend.strict, backend.kernels_given)


class _SparsePool:
    """Pooling over each active output site's window, read through the neighbour table."""

    def _call(self, x: SparseRows) -> tuple[ConvCall, torch.Tensor]:
        k = _square(self.kernel_size, "kernel", "pool")
        s = _square(self.stride, "stride", "pool")
        p = _square(self.padding, "padding", "pool")
        d = _square(getattr(self, "dilation", 1), "dilation", "pool")
        call = ConvCall(x.mask, x.stride, x.stride * s, (k, k), (p, p), (d, d), 1)
        return call, call.neighbours()

    def describe_execution(self, device, dtype) -> str:
        return f"gather     {type(self).__name__} (neighbour-table pooling)"


class SparseMaxPool2d(_SparsePool, nn.MaxPool2d):
    """Max over the window where masked sites count as 0 and padding never wins (SparK's semantics)."""

    def forward(self, x: SparseRows) -> SparseRows:
        call, table = self._call(x)
        fill = x.data.new_tensor([0.0, float("-inf")]).unsqueeze(1).expand(2, x.channels)
        taps = rows_at(torch.cat([x.data, fill]), table)              # [N_out, K, C]
        return SparseRows(taps.amax(dim=1), x.mask, call.out_stride)

    @classmethod
    def from_dense(cls, backend, pool: nn.MaxPool2d, name: str) -> "SparseMaxPool2d":
        if pool.return_indices:
            raise NotImplementedError(f"{name}: max-pool with return_indices is not supported")
        check_output_grid(pool, name)       # ceil_mode only where it changes nothing
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation)


class SparseConstantPadMaxPool2d(SparseMaxPool2d):
    """Max over the window where masked sites AND the zero padding count as 0 (BiT's padded stem pool).

    ``padding`` here is the LEADING part of :class:`~.pools.ConstantPadMaxPool2d`'s explicit zero padding
    (the window's first tap; the output grid fixes the rest): taps outside the map read the zero row,
    like masked sites, instead of never winning.
    """

    def _call(self, x: SparseRows) -> tuple[ConvCall, torch.Tensor]:
        call, table = super()._call(x)
        n_in = x.data.shape[0]
        return call, torch.where(table == n_in + 1, n_in, table)

    def describe_execution(self, device, dtype) -> str:
        return f"gather     {type(self).__name__} (neighbour-table pooling, zero padding competes)"

    @classmethod
    def from_dense(cls, backend, pool: ConstantPadMaxPool2d, name: str) -> "SparseConstantPadMaxPool2d":
        check_output_grid(pool, name, padding=pool.pad)
        return cls(pool.kernel_size, pool.stride, pool.leading_padding, pool.dilation)


class SparseAvgPool2d(_SparsePool, nn.AvgPool2d):
    """Window mean of the masked map (masked sites are zeros), as ``nn.AvgPool2d`` computes it."""

    def forward(self, x: SparseRows) -> SparseRows:
        call, table = self._call(x)
        n_in = x.data.shape[0]
        taps = table_taps(x.data, table)    # [N_out, K, C]
        if self.divisor_override:
            divisor = torch.full((table.shape[0], 1), float(self.divisor_override), dtype=x.data.dtype, device=x.data.device)
        elif self.count_include_pad:
            divisor = torch.full((table.shape[0], 1), float(table.shape[1]), dtype=x.data.dtype, device=x.data.device)
        else:
            divisor = (table != n_in + 1).sum(1, keepdim=True).to(x.data.dtype)
        return SparseRows(taps.sum(dim=1) / divisor, x.mask, call.out_stride)

    @classmethod
    def from_dense(cls, backend, pool: nn.AvgPool2d, name: str) -> "SparseAvgPool2d":
        check_output_grid(pool, name)       # ceil_mode only where it changes nothing (ResNet-D's 2x2/2 pool)
        return cls(pool.kernel_size, pool.stride, pool.padding, count_include_pad=pool.count_include_pad,
                   divisor_override=pool.divisor_override)


class SparseBlurPool2d(ConvertedBlurPool2d):
    """timm's blur pool on rows: each active output site's window through a neighbour table (masked sites
    read 0; taps beyond the map read the mirrored site for reflect padding, 0 for constant padding),
    weighted by the fixed binomial filter. No state but the filter (a non-persistent buffer)."""

    def forward(self, x: SparseRows) -> SparseRows:
        k, out_stride = self.filt_size, x.stride * self.stride
        pad, mode = self.padding[0], BLUR_PAD_MODES[self.pad_mode]
        table = x.mask.neighbour_table(x.stride, out_stride, (k, k), (pad, pad), (1, 1), padding_mode=mode)
        taps = table_taps(x.data, table)    # [N_out, K, C]
        weight = self.filt.reshape(-1, k * k).expand(x.channels, k * k).to(x.data.dtype)
        return SparseRows(torch.einsum("nkc,ck->nc", taps, weight), x.mask, out_stride)

    def describe_execution(self, device, dtype) -> str:
        return f"gather     {type(self).__name__} (neighbour-table blur, {self.pad_mode} padding)"


class RowBackend(Backend):
    """Base of the true sparse backends. Subclasses set ``name``, ``description`` and ``kernels``."""

    feature_type = SparseRows
    #: kernel names, most preferred first
    kernels: ClassVar[tuple[str, ...]] = ("gather",)
    converters = {
        **COMMON_CONVERTERS,
        **{conv_type: SparseConv2d.from_dense for conv_type in WEIGHT_TRANSFORMS},
        nn.MaxPool2d: SparseMaxPool2d.from_dense,
        ConstantPadMaxPool2d: SparseConstantPadMaxPool2d.from_dense,
        nn.AvgPool2d: SparseAvgPool2d.from_dense,
        BlurPool2d: SparseBlurPool2d.from_dense,
        nn.Upsample: SparseNearestUpsample.from_dense,
        SpaceToDepth: SparseSpaceToDepth.from_dense,
    }

    def __init__(self, strict: bool = False, kernels: Optional[Sequence[str]] = None):
        """``kernels``: the kernel names to use, most preferred first, instead of the class's :attr:`kernels`
        (an unregistered name is refused here: dispatch would skip it without a word)."""
        super().__init__(strict=strict)
        self.kernel_priority = tuple(kernels) if kernels is not None else self.kernels
        #: whether the user chose the kernels: then measured dispatch (``auto``) times only those
        self.kernels_given = kernels is not None
        if self.kernels_given:
            check_kernel_names(self.kernel_priority)

    def kernels_for(self, spec: ConvSpec) -> tuple[str, ...]:
        """The kernel names to try for one layer, best first (subclasses may choose per shape)."""
        return self.kernel_priority

