"""The layers to tune, as a training step meets them, and the timing of one kernel on one layer.

Shapes come from the model itself: one small forward pass records, for every converted conv, the
stride of its input rows and whether that input needs a gradient (the stem's input, the image,
does not, and the ``gemm`` kernel then skips its transposed table). The row counts are those of
the run's batch under a mask of the run's ratio.

A kernel is timed on its layer alone: forward and backward on random rows with the layer's own
weight (in the compute dtype), each call on a fresh :class:`ActiveMask` so that the index tables
a kernel builds for itself (neighbour tables, rulebooks), which every training step builds anew,
are part of its cost. What every layer at a stride shares whichever kernel runs (the dense mask,
the active coordinates, the index grid) is built before the clock starts. A table shared by several
layers of the same geometry is charged to each of them: tuning is then a little pessimistic for
table-based kernels on small inputs, which the whole-encoder guard (:mod:`.guard`) corrects.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
import torch
import torch.nn as nn

from ..backends.auto import sparse_convs
from ..backends.rows import SparseConv2d
from ..kernels import ConvSpec, get_kernel
from ..mask import ActiveMask
from .cache import bucket, canonical
from .memory import held_bytes
from .timing import Measurement, Timer, median_ms

__all__ = ["LayerShape", "discover_layers", "time_kernel", "layer_results", "disagreement", "layer_held_bytes",
           "model_signature"]


@dataclass(frozen=True)
class LayerShape:
    """One converted convolution with the shapes it computes on in a training step."""

    name: str
    conv: SparseConv2d
    in_stride: int
    needs_input_grad: bool
    rows_in: int
    rows_out: int
    sites_in: int

    def spec(self, device_type: str, dtype: torch.dtype) -> ConvSpec:
        return ConvSpec.of(self.conv, device_type, dtype)

    def key(self, device_type: str, dtype: torch.dtype) -> str:
        """The cache key: the layer's spec and dtype plus power-of-two buckets of its row and site counts."""
        spec = self.spec(device_type, dtype)
        return canonical({"in": spec.in_channels, "out": spec.out_channels, "k": spec.kernel_size,
                          "stride": spec.stride, "pad": spec.padding, "dil": spec.dilation, "groups": spec.groups,
                          "bias": spec.bias, "dtype": str(dtype).replace("torch.", ""),
                          "rows_in": bucket(self.rows_in), "rows_out": bucket(self.rows_out),
                          "sites_in": bucket(self.sites_in), "input_grad": self.needs_input_grad})

    @property
    def work(self) -> int:
        """Multiply-adds on the active rows (tuning measures the biggest layers first)."""
        kh, kw = self.conv.kernel_size
        return self.rows_out * kh * kw * (self.conv.in_channels // self.conv.groups) * self.conv.out_channels


def discover_layers(spark: nn.Module, active: torch.Tensor) -> list[LayerShape]:
    """Every converted conv of ``spark.encoder`` with its input stride and row counts under ``active``.

    ``active``: ``(B, 1, h, w)`` bool, the run's batch. The strides are recorded in one forward of
    a single image in eval mode (nothing is updated), with autograd on so that each conv sees
    whether its input needs a gradient.
    """
    convs = dict((module, name) for name, module in sparse_convs(spark.encoder))
    seen: dict[str, tuple[int, bool]] = {}

    def record(module, args):
        rows = args[0]
        seen[convs[module]] = (rows.stride, rows.data.requires_grad)

    hooks = [module.register_forward_pre_hook(record) for module in convs]
    modes = {module: module.training for module in spark.modules()}
    ratio = spark.downsample_ratio
    probe = ActiveMask(active[:1].clone(), ratio)
    param = next(spark.parameters())
    images = torch.zeros(1, 3, *probe.image_hw(), device=param.device, dtype=param.dtype)
    try:
        spark.eval()
        with torch.enable_grad():
            spark.encode(images, probe)
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in modes.items():
            module.training = mode
    mask = ActiveMask(active, ratio)
    shapes = []
    for module, name in convs.items():
        if name not in seen:
            continue                          # not called by the hierarchical forward
        in_stride, needs_grad = seen[name]
        out_stride = in_stride * module.stride_factor
        sites = mask.dense_at(in_stride)
        shapes.append(LayerShape(name, module, in_stride, needs_grad, mask.num_active(in_stride),
                                 mask.num_active(out_stride), int(sites.numel())))
    return shapes


def model_signature(spark: nn.Module, layers: list[LayerShape], device_type: str, dtype: torch.dtype) -> str:
    """A short hash of the encoder's parameter shapes and layer keys (part of the guard's cache key)."""
    digest = hashlib.sha1(type(spark.encoder).__qualname__.encode())
    for name, param in spark.encoder.named_parameters():
        digest.update(f"{name}{tuple(param.shape)}".encode())
    for layer in layers:
        digest.update(f"{layer.name}{layer.key(device_type, dtype)}".encode())
    return digest.hexdigest()[:16]


class _LayerRun:
    """One layer alone on one kernel: random rows with the layer's own weight (in the compute dtype)."""

    def __init__(self, layer: LayerShape, kernel_name: str, active: torch.Tensor, downsample_ratio: int,
                 dtype: torch.dtype):
        self.layer, self.kernel, self.active, self.ratio = layer, get_kernel(kernel_name), active, downsample_ratio
        conv, device = layer.conv, active.device
        gen = torch.Generator().manual_seed(0)
        self.features = torch.randn(layer.rows_in, conv.in_channels, generator=gen).to(device, dtype)
        self.features.requires_grad_(layer.needs_input_grad)
        self.weight = conv.weight.detach().to(dtype).clone().requires_grad_(conv.weight.requires_grad)
        self.bias = (None if conv.bias is None
                     else conv.bias.detach().to(dtype).clone().requires_grad_(conv.bias.requires_grad))
        self.grad_out = torch.randn(layer.rows_out, conv.out_channels, generator=gen).to(device, dtype)
        self.call = None

    def prepare(self) -> None:
        """A fresh mask, with what every layer at these strides shares built (untimed)."""
        for tensor in (self.features, self.weight, self.bias):
            if tensor is not None:
                tensor.grad = None
        mask = ActiveMask(self.active, self.ratio)
        self.call = self.layer.conv.conv_call(mask, self.layer.in_stride)
        mask.index_grid(self.call.in_stride), mask.index_grid(self.call.out_stride)

    def forward(self) -> torch.Tensor:
        return self.kernel.conv(self.features, self.weight, self.bias, self.call)

    def forward_backward(self) -> torch.Tensor:
        out = self.forward()
        if out.requires_grad:
            out.backward(self.grad_out)
        return out


def time_kernel(layer: LayerShape, kernel_name: str, active: torch.Tensor, downsample_ratio: int,
                dtype: torch.dtype, timer: Timer, warmup: int, repeats: int,
                give_up_above: float | None = None) -> float:
    """Median ms of one forward+backward of ``layer`` on kernel ``kernel_name`` (see the module docstring)."""
    run = _LayerRun(layer, kernel_name, active, downsample_ratio, dtype)
    with torch.enable_grad():
        return median_ms(timer, run.forward_backward, Measurement("layer", layer.name, kernel_name), warmup, repeats,
                         prepare=run.prepare, give_up_above=give_up_above)


#: how far a candidate's outputs and gradients may lie from the static kernel's, relative to the largest value of
#: each: the rounding of another summation order in the dtype (a kernel with other maths is off by O(1))
AGREEMENT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def layer_results(layer: LayerShape, kernel_name: str, active: torch.Tensor, downsample_ratio: int,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The output rows and the input, weight and bias gradients of one forward+backward of ``layer`` on
    ``kernel_name``, from the same random rows :func:`time_kernel` uses."""
    run = _LayerRun(layer, kernel_name, active, downsample_ratio, dtype)
    run.prepare()
    with torch.enable_grad():
        out = run.forward_backward()
    results = {"output": out.detach()}
    for name, tensor in (("input grad", run.features), ("weight grad", run.weight), ("bias grad", run.bias)):
        if tensor is not None and tensor.grad is not None:
            results[name] = tensor.grad
    return results


def disagreement(results: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                 dtype: torch.dtype) -> str | None:
    """Where ``results`` differ from ``reference`` beyond :data:`AGREEMENT_TOLERANCE` (a plug-in kernel with other
    maths, or a broken one), as ``"weight grad: max rel err 0.83"``; ``None`` when they agree."""
    tolerance = AGREEMENT_TOLERANCE.get(dtype, 1e-2)
    for name, expected in reference.items():
        got = results.get(name)
        if got is None or got.shape != expected.shape:
            found = "nothing" if got is None else f"shape {tuple(got.shape)}"
            return f"{name}: {found} where the reference has shape {tuple(expected.shape)}"
        scale = expected.abs().max().item() if expected.numel() else 0.0
        wide = torch.promote_types(expected.dtype, torch.float32)      # fp64 stays fp64: its tolerance is 1e-9
        error = (got.to(wide) - expected.to(wide)).abs().max().item() if expected.numel() else 0.0
        if not error <= tolerance * max(scale, 1e-30):      # nan fails too
            return f"{name}: max abs err {error:.3g}, {error / max(scale, 1e-30):.3g} of its largest value"
    return None


def layer_held_bytes(layer: LayerShape, kernel_name: str, active: torch.Tensor, downsample_ratio: int,
                     dtype: torch.dtype) -> int:
    """Bytes ``layer``'s forward on ``kernel_name`` holds for backward beyond its input rows and weights
    (which exist whatever runs); the mask's index grids are built beforehand, as for timing."""
    run = _LayerRun(layer, kernel_name, active, downsample_ratio, dtype)
    run.prepare()
    return held_bytes(run.forward, exclude=[run.features, run.weight, run.bias])
