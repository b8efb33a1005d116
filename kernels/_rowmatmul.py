"""Row-matrix products ``[N, K] x [O, K]^T`` through oneDNN's 1x1 convolution where it is faster.

On the CPUs measured, oneDNN's 1x1 convolution of the same matrices, viewed as an NHWC image of
N x 1 pixels, is markedly faster than ``torch.mm`` on the kernels' GEMM shapes; the view costs no
copy. Measure both on a machine with ``python benchmarks/reference_points.py --sections gemm`` (the
rendered figures are in BENCHMARKS.md). Other devices and dtypes use the plain matmul (cuBLAS on CUDA).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["rows_times_weight", "rows_times_weight_backward", "uses_onednn"]


def uses_onednn(x: torch.Tensor) -> bool:
    """oneDNN for CPU fp32/bf16 rows; not for no rows (every patch masked), which its conv refuses."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.shape[0] > 0


def _as_image(rows: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` -> ``(1, C, N, 1)`` channels-last view of the same memory."""
    rows = rows.contiguous()
    return rows.view(1, rows.shape[0], 1, rows.shape[1]).permute(0, 3, 1, 2)


def _as_rows(image: torch.Tensor) -> torch.Tensor:
    return image.permute(0, 2, 3, 1).reshape(image.shape[2], image.shape[1])


def rows_times_weight(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``rows [N, K] @ weight[O, K]^T`` (differentiable)."""
    if uses_onednn(rows):
        return _as_rows(F.conv2d(_as_image(rows), weight.reshape(weight.shape[0], -1, 1, 1)))
    return rows @ weight.reshape(weight.shape[0], -1).t()


def rows_times_weight_backward(grad: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, need_rows: bool,
                               need_weight: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of :func:`rows_times_weight` w.r.t. ``rows`` ``[N, K]`` and ``weight`` ``[O, K]``."""
    if uses_onednn(rows):
        grad_rows, grad_weight, _ = torch.ops.aten.convolution_backward(
            _as_image(grad), _as_image(rows), weight.reshape(weight.shape[0], -1, 1, 1), None, [1, 1], [0, 0], [1, 1],
            False, [0, 0], 1, [need_rows, need_weight, False])
        return (_as_rows(grad_rows) if need_rows else None), (grad_weight.view_as(weight) if need_weight else None)
    return (grad @ weight if need_rows else None), (grad.t() @ rows if need_weight else None)
