"""The library backends (``spconv``, ``minkowski``) in fp32 with 2 threads, against an fp64 reference.

Equivalence tests compare a backend with fp32 ``masked``, which carries its own rounding error; here
every fp32 result (output rows, input gradient, every parameter gradient) is compared with the same
layer run in fp64 on ``masked``, and must be within a small factor of ``masked``'s own fp32 error on
the same tensor: a library that accumulates badly, or races between threads, fails this even where
it would pass a loose tolerance against fp32 ``masked``.

spconv's CPU scatter-add races under several OpenMP threads (see ``kernels/spconv_kernel.py``): the
race test runs at 56x56 with 2 threads, several times, since the race is intermittent.
"""
from __future__ import annotations

import copy
from typing import Optional

import pytest
import torch
import torch.nn as nn

from spark_sparse import ActiveMask, MaskedDense, SparseRows
from spark_sparse.backends import create_backend, list_backends

from equivalence import max_errors

LIBRARY_BACKENDS = ("spconv", "minkowski")
RACE_RUNS = 16


def _unavailable_reason(name: str) -> Optional[str]:
    """Why backend ``name`` cannot run here, or None if it can."""
    info = {i.name: i for i in list_backends()}.get(name)
    if info is None:
        return f"backend {name} is not registered"
    return None if info.available else f"backend {name} unavailable: {info.reason}"


def _skip_unless_available(name: str) -> None:
    reason = _unavailable_reason(name)
    if reason:
        pytest.skip(reason)


def library_params() -> list:
    """One param per library backend, skipped with the reason where it cannot run."""
    params = []
    for name in LIBRARY_BACKENDS:
        reason = _unavailable_reason(name)
        params.append(pytest.param(name, id=name, marks=[pytest.mark.skip(reason=reason)] if reason else []))
    return params


# fp32 error allowed: FACTOR x masked's own fp32 error on the same tensor, and never less than a few
# units in the last place (masked's error on a tensor can be exactly 0 or a single rounding).
FACTOR = 4.0
FLOOR = 4 * torch.finfo(torch.float32).eps

# name -> (layer factory, input stride, input channels); the conv shapes SparK's encoders use
LAYERS = {
    "conv3x3": (lambda: nn.Conv2d(32, 48, 3, padding=1), 4, 32),
    "conv1x1": (lambda: nn.Conv2d(32, 96, 1, bias=False), 4, 32),
    "conv3x3_stride2": (lambda: nn.Conv2d(32, 48, 3, stride=2, padding=1, bias=False), 4, 32),
    "conv2x2_stride2": (lambda: nn.Conv2d(32, 48, 2, stride=2), 4, 32),
    "conv1x1_stride2": (lambda: nn.Conv2d(32, 48, 1, stride=2, bias=False), 4, 32),
    "stem4x4_stride4": (lambda: nn.Conv2d(3, 32, 4, stride=4), 1, 3),
    "stem7x7_stride2": (lambda: nn.Conv2d(3, 32, 7, stride=2, padding=3, bias=False), 1, 3),
    "depthwise7x7": (lambda: nn.Conv2d(32, 32, 7, padding=3, groups=32), 4, 32),
    "convnext_block": (lambda: nn.Sequential(nn.Conv2d(32, 32, 7, padding=3, groups=32), nn.Conv2d(32, 128, 1),
                                             nn.GELU(), nn.Conv2d(128, 32, 1)), 4, 32),
    "resnet_block": (lambda: nn.Sequential(nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                           nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                           nn.Conv2d(32, 64, 1, bias=False)), 4, 32),
}


@pytest.fixture
def two_threads():
    """Run the test with 2 intra-op threads (the race needs several); the count is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _mask(grid: int, batch: int = 2, seed: int = 0) -> ActiveMask:
    """A SparK mask on a ``grid x grid`` patch grid of 16 px patches (stride-4 maps are 4*grid wide)."""
    return ActiveMask.random(batch, (grid, grid), 0.5, downsample_ratio=16, generator=torch.Generator().manual_seed(seed))


def _run(layer: nn.Module, backend: str, mask: ActiveMask, stride: int, dense: torch.Tensor) -> dict:
    """Output rows, input gradient (per active row) and parameter gradients of one fwd+bwd.

    The upstream gradient is a fixed random tensor, drawn in fp64 and rounded to ``dense.dtype``.
    """
    site = mask.dense_at(stride)
    holder = create_backend(backend).convert(nn.Sequential(copy.deepcopy(layer).to(dense.dtype)))
    if backend == "masked":
        x = dense.clone().requires_grad_(True)
        rows = holder(MaskedDense(x, mask, stride)).active_rows()
    else:
        x = dense.permute(0, 2, 3, 1)[site[:, 0]].clone().requires_grad_(True)
        rows = holder(SparseRows(x, mask, stride)).data
    upstream = torch.randn(rows.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (rows * upstream.to(rows.dtype)).sum().backward()
    grad_in = x.grad if backend != "masked" else x.grad.permute(0, 2, 3, 1)[site[:, 0]]
    results = {"output": rows.detach(), "grad_input": grad_in}
    results.update({f"grad_{name}": p.grad for name, p in holder.named_parameters()})
    return results


def _fp32_vs_fp64(layer: nn.Module, backend: str, mask: ActiveMask, stride: int, channels: int) -> dict:
    """``{tensor: (backend fp32 error, masked fp32 error)}``, relative errors vs fp64 ``masked``."""
    site = mask.dense_at(stride)
    dense = torch.randn(mask.batch_size, channels, *site.shape[-2:], generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64) * site
    exact = _run(layer, "masked", mask, stride, dense)
    masked32 = _run(layer, "masked", mask, stride, dense.float())
    got32 = _run(layer, backend, mask, stride, dense.float())
    assert got32.keys() == exact.keys()
    return {k: (max_errors(got32[k].double(), exact[k])[1], max_errors(masked32[k].double(), exact[k])[1])
            for k in exact}


@pytest.mark.parametrize("backend", library_params())
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_fp32_precision_matches_masked(backend, layer_name, two_threads):
    factory, stride, channels = LAYERS[layer_name]
    torch.manual_seed(0)
    errors = _fp32_vs_fp64(factory(), backend, _mask(grid=6), stride, channels)
    for tensor, (got, masked) in errors.items():
        bound = FACTOR * max(masked, FLOOR)
        assert got <= bound, (f"{backend} {layer_name} {tensor}: fp32 error {got:.2e} vs fp64, "
                              f"masked's own fp32 error {masked:.2e} (bound {bound:.2e})")


def test_spconv_has_no_thread_race_at_56x56(two_threads):
    """A 3x3 conv on 56x56 maps with 2 threads equals the fp64 reference on every one of many runs.

    spconv's own CPU scatter-add gave wrong rows (errors of order 1) in a varying share of such calls,
    depending on how the two threads interleave: one run proves little, so the same call is repeated.
    """
    _skip_unless_available("spconv")
    mask = _mask(grid=14)                                   # 224 px images: stride-4 maps are 56x56
    layer = nn.Conv2d(64, 64, 3, padding=1)
    dense = torch.randn(2, 64, 56, 56, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * mask.dense_at(4)
    exact = _run(layer, "masked", mask, 4, dense)
    masked32 = _run(layer, "masked", mask, 4, dense.float())
    bounds = {k: FACTOR * max(max_errors(masked32[k].double(), exact[k])[1], FLOOR) for k in exact}
    wrong = []
    for run in range(RACE_RUNS):
        got = _run(layer, "spconv", mask, 4, dense.float())
        wrong += [(run, k, err) for k in exact if (err := max_errors(got[k].double(), exact[k])[1]) > bounds[k]]
    assert not wrong, f"{len(wrong)} wrong tensors in {RACE_RUNS} runs (run, tensor, relative error): {wrong[:5]}"


@pytest.mark.parametrize("backend", library_params())
@pytest.mark.parametrize("threads", [1, 3])
def test_library_leaves_the_thread_count_alone(backend, threads, monkeypatch):
    """A forward+backward on a new mask never changes the process's thread count.

    spconv's CPU path used to set 1 thread around every call and restore it (so the count is also
    checked for never being set at all); MinkowskiEngine's coordinate manager sets OpenMP's count to
    min(cpu count, 20) when created with its default: one of 1 and 3 differs from that on any machine.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    try:
        mask = _mask(grid=4)
        _run(nn.Conv2d(16, 16, 3, padding=1), backend, mask, 4,
             torch.randn(2, 16, 16, 16, dtype=torch.float32) * mask.dense_at(4))
        assert calls == [], f"{backend} forward/backward called torch.set_num_threads({calls})"
        assert torch.get_num_threads() == threads, f"{backend} changed the thread count to {torch.get_num_threads()}"
    finally:
        monkeypatch.undo()
        torch.set_num_threads(before)
