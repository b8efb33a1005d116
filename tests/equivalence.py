"""Comparing a sparse backend with ``masked`` on the same weights and mask (used by the tests)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from spark_sparse import ActiveMask, MaskedDense, SparseRows
from spark_sparse.backends import create_backend, list_backends
from spark_sparse.backends.registry import get_backend_class


def sparse_backend_params() -> list:
    """Every registered sparse backend, skipped with its reason where unavailable.

    ``auto`` is one of them: built without tuning it runs the ``sparse`` backend's static rule;
    tests/test_autotune.py checks it tuned onto other kernels than that rule's.
    """
    params = []
    for info in list_backends():
        if get_backend_class(info.name).feature_type is not SparseRows:
            continue
        marks = [] if info.available else [pytest.mark.skip(reason=f"backend {info.name} unavailable: {info.reason}")]
        params.append(pytest.param(info.name, marks=marks, id=info.name))
    return params


def draw_learnable_affines(module: nn.Module, seed: int = 5) -> None:
    """HGNet-V2's learnable affine blocks start as the identity (scale 1, bias 0): draw both from
    U(-1, 1.5), in place, so negative scales and biases let masked zeros and the stem's zero padding
    win max-pool windows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith(("lab.scale", "lab.bias")):
                param.copy_(torch.empty(param.shape, dtype=param.dtype).uniform_(-1.0, 1.5, generator=gen))


def max_errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error relative to the largest reference magnitude)."""
    abs_err = float((got - want).detach().abs().max()) if got.numel() else 0.0
    return abs_err, abs_err / max(float(want.abs().max()) if want.numel() else 0.0, 1e-30)


def run_layer_pair(layer: nn.Module, backend: str, mask: ActiveMask, stride: int, channels: int,
                   dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> dict:
    """Run ``layer`` on masked and on ``backend`` from one random input; outputs and grads of both.

    Random numbers are drawn on the CPU and moved to ``device``: a CUDA run sees the same inputs.
    """
    gen = torch.Generator().manual_seed(seed)
    mask = mask.to(device)
    site = mask.dense_at(stride)
    dense = torch.randn(mask.batch_size, channels, *site.shape[-2:], generator=gen, dtype=dtype).to(device) * site
    results = {}
    for name in ("masked", backend):
        holder = create_backend(name).convert(nn.Sequential(copy.deepcopy(layer).to(device, dtype)))
        if name == "masked":
            x = dense.clone().requires_grad_(True)
            out = holder(MaskedDense(x, mask, stride))
            out_dense = out.data
            out_rows = out.active_rows()
        else:
            x = dense.permute(0, 2, 3, 1)[site[:, 0]].clone().requires_grad_(True)
            out = holder(SparseRows(x, mask, stride))
            out_rows = out.data
            out_dense = out.to_dense()
        weights = torch.randn(out_rows.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype).to(device)
        (out_rows * weights).sum().backward()
        grad_in = x.grad if name != "masked" else x.grad.permute(0, 2, 3, 1)[site[:, 0]]
        results[name] = dict(out_rows=out_rows.detach(), out_dense=out_dense.detach(), out_stride=out.stride,
                             grad_in=grad_in, params={k: p.grad for k, p in holder.named_parameters()},
                             buffers={k: b.clone() for k, b in holder.named_buffers()})
    return results


def assert_layer_pair_matches(results: dict, backend: str, mask: ActiveMask, tol: float) -> None:
    """A :func:`run_layer_pair` result: ``backend`` equals ``masked`` (same output stride and rows, exact
    zeros at masked sites, input, parameter and buffer gradients within ``tol``; parameter gradients
    scaled by their largest reference magnitude)."""
    ref, got = results["masked"], results[backend]
    assert got["out_stride"] == ref["out_stride"]
    site = mask.dense_at(ref["out_stride"]).expand_as(ref["out_dense"])
    assert torch.all(ref["out_dense"][~site] == 0) and torch.all(got["out_dense"][~site] == 0)
    assert got["out_rows"].shape == ref["out_rows"].shape
    for what in ("out_rows", "grad_in"):
        abs_err, _ = max_errors(got[what], ref[what])
        assert abs_err <= tol, f"{what}: max abs error {abs_err:.3g}"
    assert ref["params"].keys() == got["params"].keys()
    for name, grad in ref["params"].items():
        abs_err, rel_err = max_errors(got["params"][name], grad)
        assert abs_err <= tol * max(1.0, float(grad.abs().max())), f"grad {name}: {abs_err:.3g} (rel {rel_err:.3g})"
    for name, buf in ref["buffers"].items():
        abs_err, _ = max_errors(got["buffers"][name].to(buf.dtype), buf)
        assert abs_err <= tol, f"buffer {name}: {abs_err:.3g}"


def assert_encoder_matches_timm(spark, model: str, state: dict, atol: float) -> None:
    """Plain ``timm.create_model(model, num_classes=0)`` loads ``state`` strictly and, on an all-visible
    mask, gives the SparK encoder's hierarchical features."""
    import timm

    dense = timm.create_model(model, pretrained=False, num_classes=0)
    dense.load_state_dict(state, strict=True)
    spark.eval(), dense.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = [f.to_dense() for f in spark.encode(images, ActiveMask.full(2, (2, 2)))]
        theirs = dense.forward_intermediates(images, intermediates_only=True)[-4:]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)
