"""What a sparse convolution kernel is: declared capabilities plus one function.

Following xformers' fmha dispatch, each kernel is a small class that states what it supports
(devices, dtypes, groups, dilation, strides, kernel sizes) and explains in words why it cannot run
a given layer (:meth:`SparseConvKernel.not_supported_reasons`). Backends hold a priority list of
kernel names; each layer runs on the first kernel with no reasons against it.

Every kernel computes SparK's masked convolution restricted to active sites: for each active output
site at ``call.out_stride``, the dense convolution (zero padding) of the input in which masked
sites are zero. Inputs and outputs are ``[N, C]`` rows in ``mask.coords_at(stride)`` order; the
weight is the module's own dense ``[O, C / groups, kh, kw]`` parameter (kernels that need another
layout convert it with their exact ``to_native`` / ``from_native`` pair).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from ..mask import ActiveMask

__all__ = ["ConvSpec", "ConvCall", "SparseConvKernel", "int_pair"]


def int_pair(value) -> tuple[int, int]:
    """A conv or pool argument (``kernel_size``, ``stride``, ``padding``, ...) as ``(height, width)``."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class ConvSpec:
    """The static description of one convolution layer plus the device and dtype it runs with."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    bias: bool
    device_type: str
    dtype: torch.dtype

    @classmethod
    def of(cls, conv: nn.Conv2d, device: torch.device | str, dtype: torch.dtype) -> "ConvSpec":
        return cls(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
                   tuple(conv.padding), tuple(conv.dilation), conv.groups, conv.bias is not None,
                   torch.device(device).type, dtype)

    @property
    def is_depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels

    def describe(self) -> str:
        kh, kw = self.kernel_size
        extra = "".join([f" s{self.stride[0]}" if self.stride != (1, 1) else "",
                         f" d{self.dilation[0]}" if self.dilation != (1, 1) else "",
                         " depthwise" if self.is_depthwise else (f" g{self.groups}" if self.groups > 1 else "")])
        return f"{self.in_channels}->{self.out_channels} {kh}x{kw}{extra}"


@dataclass(frozen=True)
class ConvCall:
    """Where one call computes: the mask, the input and output strides and the conv geometry.

    ``padding`` is the zero padding BEFORE the first site of each axis: output site ``i`` reads input
    ``i * step - padding + tap * dilation``, and the output grid is the input grid downsampled by the
    step (so the trailing padding follows; TensorFlow-"SAME" convs have less before than after).
    """

    mask: "ActiveMask"
    in_stride: int
    out_stride: int
    kernel_size: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def neighbours(self) -> torch.Tensor:
        """``[N_out, kh * kw]`` input rows under each tap (``N_in``: masked, ``N_in + 1``: padding)."""
        return self.mask.neighbour_table(self.in_stride, self.out_stride, self.kernel_size, self.padding,
                                         self.dilation)

    @property
    def num_in(self) -> int:
        return self.mask.num_active(self.in_stride)

    @property
    def num_out(self) -> int:
        return self.mask.num_active(self.out_stride)


class SparseConvKernel:
    """Base class. Subclasses set the capability attributes and implement :meth:`conv`."""

    NAME: ClassVar[str]
    DESCRIPTION: ClassVar[str] = ""
    SUPPORTED_DEVICES: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda"})
    SUPPORTED_DTYPES: ClassVar[frozenset[torch.dtype]] = frozenset({torch.float32, torch.float64,
                                                                     torch.float16, torch.bfloat16})
    #: "any", "depthwise" (groups == 1 or depthwise) or "none" (groups == 1 only)
    SUPPORTED_GROUPS: ClassVar[str] = "any"
    SUPPORTS_DILATION: ClassVar[bool] = True
    SUPPORTS_STRIDE: ClassVar[bool] = True
    #: largest kernel side, or None for any
    MAX_KERNEL_SIZE: ClassVar[Optional[int]] = None
    #: odd kernel sizes only (centred windows)
    ODD_KERNELS_ONLY: ClassVar[bool] = False
    #: devices on which equal inputs and an equal mask (even one built afresh) give bit-identical outputs
    #: and gradients, which exact resume needs; the CPU claim is checked by the tests. CUDA is not
    #: claimed by default: scatter-adds there are atomics and cuDNN's default backward is not reproducible.
    REPRODUCIBLE_ON: ClassVar[frozenset[str]] = frozenset({"cpu"})

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """``(True, "")`` when its library imports and works here, else ``(False, why)``."""
        return True, ""

    @classmethod
    def not_supported_reasons(cls, spec: ConvSpec) -> list[str]:
        """Every reason, in words, why this kernel cannot run ``spec`` (empty: it can)."""
        reasons = []
        available, why = cls.availability()
        if not available:
            reasons.append(why)
        if spec.device_type not in cls.SUPPORTED_DEVICES:
            reasons.append(f"device {spec.device_type} not in {sorted(cls.SUPPORTED_DEVICES)}")
        if spec.dtype not in cls.SUPPORTED_DTYPES:
            names = sorted(str(d).replace("torch.", "") for d in cls.SUPPORTED_DTYPES)
            reasons.append(f"dtype {str(spec.dtype).replace('torch.', '')} not supported (supports {', '.join(names)})")
        if spec.groups > 1:
            if cls.SUPPORTED_GROUPS == "none":
                reasons.append(f"groups={spec.groups}: supports groups=1 only")
            elif cls.SUPPORTED_GROUPS == "depthwise" and not spec.is_depthwise:
                reasons.append(f"groups={spec.groups}: supports groups=1 or depthwise only")
        if spec.dilation != (1, 1) and not cls.SUPPORTS_DILATION:
            reasons.append(f"dilation={spec.dilation}: no dilation support")
        if spec.stride != (1, 1) and not cls.SUPPORTS_STRIDE:
            reasons.append(f"stride={spec.stride}: stride-1 only")
        if cls.MAX_KERNEL_SIZE is not None and max(spec.kernel_size) > cls.MAX_KERNEL_SIZE:
            reasons.append(f"kernel {spec.kernel_size}: at most {cls.MAX_KERNEL_SIZE}x{cls.MAX_KERNEL_SIZE}")
        if cls.ODD_KERNELS_ONLY and spec.stride == (1, 1) and any(k % 2 == 0 for k in spec.kernel_size):
            reasons.append(f"kernel {spec.kernel_size}: odd kernel sizes only")
        reasons.extend(cls.extra_reasons(spec))
        return reasons

    @classmethod
    def extra_reasons(cls, spec: ConvSpec) -> list[str]:
        """Kernel-specific limits beyond the declarative ones."""
        return []

    def conv(self, features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             call: ConvCall) -> torch.Tensor:
        """``[N_in, C]`` -> ``[N_out, O]`` (must be differentiable w.r.t. features, weight and bias)."""
        raise NotImplementedError
