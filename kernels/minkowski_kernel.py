"""``minkowski``: MinkowskiEngine 0.5.4's sparse convolution on explicit coordinates.

Each mask gets one ME ``CoordinateManager`` (cached on the mask) holding the active coordinates of
every stride, inserted explicitly (never ``ME.to_sparse``, which drops visible sites whose
features are zero). Coordinates are in input pixels (``y * stride``) at tensor stride ``stride``,
so a strided conv's output map is exactly the downsampled active set. ME keeps its own row order;
we permute in and out of it with the maps ME returns. Ordinary convs run through ME's
``MinkowskiConvolutionFunction``; depthwise ones through ME's kernel map, as
``MinkowskiChannelwiseConvolution`` computes them.

ME's coordinate manager is created with ``num_threads=0`` so that it never sets the process's OpenMP
thread count (its default does, on every new manager). ME 0.5.4 imports ``collections.Sequence``, removed in Python 3.10: the alias (to the same
``collections.abc.Sequence``) exists only while ME imports, and only when missing. ME is imported the
first time the kernel is used or asked whether it is available.
"""
from __future__ import annotations

import collections
import collections.abc
import warnings
from typing import Optional

import torch

from ._optional import OptionalLibrary
from .base import ConvCall, ConvSpec, SparseConvKernel
from .gather import GatherKernel
from .registry import register_kernel

__all__ = ["MINKOWSKI", "MinkowskiKernel", "to_native", "from_native"]


def _import_minkowski():
    """``(ME, its convolution function, its ConvolutionMode)``, with the Python >= 3.10 alias in place
    only while ME imports (it binds ``collections.Sequence`` at import time)."""
    added_alias = not hasattr(collections, "Sequence")
    if added_alias:
        collections.Sequence = collections.abc.Sequence
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # "compiled with CPU_ONLY" is expected on CPU builds
            import MinkowskiEngine as me
            from MinkowskiEngineBackend._C import ConvolutionMode
    finally:
        if added_alias:
            del collections.Sequence
    return me, me.MinkowskiConvolutionFunction, ConvolutionMode


MINKOWSKI = OptionalLibrary("MinkowskiEngine", _import_minkowski,
                            "build it with scripts/install_minkowski.sh (see README)")


def to_native(weight: torch.Tensor, depthwise: bool = False) -> torch.Tensor:
    """Dense ``[O, C, kh, kw]`` -> ME's ``[kh*kw, C, O]`` with the first spatial axis fastest.

    ME enumerates kernel offsets with the first coordinate (y) varying fastest, so offset index
    ``ky + kh * kx`` holds dense tap ``(ky, kx)``. 1x1 kernels are ``[C, O]``; depthwise kernels
    (``groups == C == O``, weight ``[C, 1, kh, kw]``) are ``[kh*kw, C]``.
    """
    out_ch, in_per_group, kh, kw = weight.shape
    if depthwise:
        return weight[:, 0].permute(2, 1, 0).reshape(kh * kw, out_ch).contiguous()
    native = weight.permute(3, 2, 1, 0).reshape(kh * kw, in_per_group, out_ch)
    return native[0].contiguous() if (kh, kw) == (1, 1) else native.contiguous()


def from_native(native: torch.Tensor, kernel_size: tuple[int, int], depthwise: bool = False) -> torch.Tensor:
    """Inverse of :func:`to_native`."""
    kh, kw = kernel_size
    if depthwise:
        channels = native.shape[1]
        return native.reshape(kw, kh, channels).permute(2, 1, 0)[:, None].contiguous()
    if native.dim() == 2:
        return native.t()[:, :, None, None].contiguous()
    taps, in_ch, out_ch = native.shape
    return native.reshape(kw, kh, in_ch, out_ch).permute(3, 2, 1, 0).contiguous()


class _Coordinates:
    """One ME coordinate manager per mask, with each stride's map key and row permutations."""

    def __init__(self, mask):
        self.mask = mask
        me = MINKOWSKI.get()[0]
        # num_threads=0: ME's default (min(cpu count, 20)) makes its manager call omp_set_dynamic(0) and
        # omp_set_num_threads(n), which resolve to torch's OpenMP runtime and so change the whole
        # process's thread count (torch.get_num_threads() included). With 0 it leaves both alone and
        # its kernel-map loops use the process's current count.
        self.manager = me.CoordinateManager(D=2, num_threads=0,
                                            coordinate_map_type=me.CoordinateMapType.CPU
                                            if mask.device.type == "cpu" else me.CoordinateMapType.CUDA)
        self.keys: dict[int, tuple] = {}

    def at(self, stride: int):
        """``(map key, our row of each ME row, ME row of each of our rows)`` at ``stride``."""
        if stride not in self.keys:
            coords = self.mask.coords_at(stride).clone()
            coords[:, 1:] *= stride
            key, (unique_map, inverse_map) = self.manager.insert_and_map(coords.int().contiguous(), [stride, stride], "")
            self.keys[stride] = (key, unique_map.long(), inverse_map.long())
        return self.keys[stride]


@register_kernel
class MinkowskiKernel(SparseConvKernel):
    NAME = "minkowski"
    DESCRIPTION = "MinkowskiEngine 0.5.4 convolution on explicit coordinates (one coordinate manager per mask)"
    SUPPORTED_DTYPES = frozenset({torch.float32, torch.float64})     # ME has no fp16/bf16 kernels
    SUPPORTED_GROUPS = "depthwise"                                  # channelwise conv, no general groups
    # it orders each tap's pairs by the coordinate manager's hash map, which differs between two managers
    # built for the same mask: equal inputs give weight gradients (and, seen in some processes, strided
    # convs' outputs) that differ in the last bits (docs/library_backends.md)
    REPRODUCIBLE_ON = frozenset()

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return MINKOWSKI.availability()

    @classmethod
    def extra_reasons(cls, spec: ConvSpec) -> list[str]:
        reasons = []
        if spec.device_type == "cuda" and MINKOWSKI.availability()[0] and not MINKOWSKI.get()[0].is_cuda_available():
            reasons.append("this MinkowskiEngine build is CPU-only")
        centred = tuple((k // 2) * d for k, d in zip(spec.kernel_size, spec.dilation))
        if any(k % 2 for k in spec.kernel_size):
            if spec.padding != centred:
                reasons.append(f"odd kernels need centred padding {centred} (ME windows are centred), got {spec.padding}")
        elif spec.padding != (0, 0) or spec.stride != spec.kernel_size:
            reasons.append("even kernels only as non-overlapping patchify convs (stride = kernel, padding 0)")
        return reasons

    def conv(self, features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             call: ConvCall) -> torch.Tensor:
        if features.shape[0] == 0:
            # every patch masked: ME 0.5.4 crashes the process (segfault) on a map without coordinates;
            # there is nothing to compute, and the gather kernel returns the empty rows and zero gradients
            return GatherKernel().conv(features, weight, bias, call)
        coords: _Coordinates = call.mask.cached("minkowski-coordinates", lambda: _Coordinates(call.mask))
        in_key, in_unique, _ = coords.at(call.in_stride)
        out_key, _, out_inverse = coords.at(call.out_stride)
        step = call.out_stride // call.in_stride
        feats = features[in_unique]                                     # into ME's row order
        depthwise = call.groups > 1          # the only grouped conv this kernel accepts
        if depthwise:
            out = self._channelwise(coords.manager, feats, to_native(weight, depthwise=True), in_key, out_key,
                                    call, step)
        elif weight.shape[-2:] == (1, 1) and step == 1:
            out = feats @ to_native(weight)
        else:
            me, conv_function, convolution_mode = MINKOWSKI.get()
            generator = me.KernelGenerator(kernel_size=list(call.kernel_size), stride=step,
                                           dilation=list(call.dilation), dimension=2)
            kernel = to_native(weight).reshape(-1, weight.shape[1], weight.shape[0])   # [K, C, O], also for 1x1
            out = conv_function.apply(feats, kernel, generator, convolution_mode.DEFAULT,
                                      in_key, out_key, coords.manager)
        out = out[out_inverse]                                          # back to our row order
        return out if bias is None else out + bias

    @staticmethod
    def _channelwise(manager, feats, kernel, in_key, out_key, call, step):
        generator = MINKOWSKI.get()[0].KernelGenerator(kernel_size=list(call.kernel_size), stride=step,
                                                       dilation=list(call.dilation), dimension=2)
        region_type, region_offset, _ = generator.get_kernel([call.in_stride] * 2, False)
        kernel_map = manager.kernel_map(in_key, out_key, step, list(call.kernel_size), list(call.dilation),
                                        region_type=region_type, region_offset=region_offset)
        out = feats.new_zeros(manager.size(out_key), feats.shape[1])
        for tap, in_out in kernel_map.items():
            in_out = in_out.long().to(feats.device)
            out = out.index_add(0, in_out[1], feats[in_out[0]] * kernel[tap])
        return out
