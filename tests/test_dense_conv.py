"""``dense_conv2d``: the library conv of the ``masked`` backend and the ``dense`` kernel.

Strided 1x1 convs run unit-stride on a strided slice on the CPU, away from oneDNN's NHWC 1x1
weight-gradient bug (oneDNN issue 6035: heap corruption or wrong weight gradients when the input
has fewer channels than oneDNN's channel block). The crash kills the process, so the regression
runs in a subprocess and reports what happened.
"""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from spark_sparse.kernels._dense_conv import dense_conv2d, is_strided_pointwise

CASES = [  # (kernel, stride, padding): the first three take the unit-stride route
    (1, 2, 0), (1, (2, 1), 0), (1, 3, "valid"), (1, 2, 1), (3, 2, 1), (1, 1, 0),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("kernel,stride,padding", CASES)
def test_dense_conv2d_is_conv2d_forward_and_backward(kernel, stride, padding, channels_last):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 13, 11, dtype=torch.float64, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 3, kernel, kernel, dtype=torch.float64, generator=gen)
    b = torch.randn(5, dtype=torch.float64, generator=gen)
    results = []
    for conv in (F.conv2d, dense_conv2d):
        inputs = [t.clone().requires_grad_(True) for t in (x, w, b)]
        out = conv(*inputs, stride=stride, padding=padding)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        results.append([out.detach()] + [t.grad for t in inputs])
    for got, want in zip(*results[::-1]):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_only_unpadded_strided_one_by_one_convs_are_rerouted():
    w1, w3 = torch.empty(4, 3, 1, 1), torch.empty(4, 3, 3, 3)
    assert is_strided_pointwise(w1, 2, 0) and is_strided_pointwise(w1, (1, 2), "valid")
    assert not is_strided_pointwise(w1, 1, 0) and not is_strided_pointwise(w1, 2, 1)
    assert not is_strided_pointwise(w3, 2, 0) and not is_strided_pointwise(w1, 2, "same")


REGRESSION = textwrap.dedent("""
    import torch, torch.nn as nn
    import spark_sparse as ss
    from spark_sparse import ActiveMask, MaskedDense, SparseRows
    from spark_sparse.kernels._dense_conv import dense_conv2d

    torch.manual_seed(0)
    # RepVGG's stem branch: 3 -> 64 channels, 1x1, stride 2, on a channels-last 224 px batch of 8
    x = torch.randn(8, 224, 224, 3).permute(0, 3, 1, 2)
    w = torch.randn(64, 3, 1, 1)
    g = torch.randn(8, 64, 112, 112)
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    torch.nn.functional.conv2d(x64, w64, stride=2).backward(g.double())
    worst = 0.0
    for _ in range(5):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        dense_conv2d(xi, wi, None, stride=2).backward(g)
        worst = max(worst, float((wi.grad - w64.grad).abs().max() / w64.grad.abs().max()),
                    float((xi.grad - x64.grad).abs().max() / x64.grad.abs().max()))
    assert worst < 1e-4, worst

    # the same layer on the masked backend (channels-last, as --channels_last / --recipe fast run it)
    # and on the dense kernel of the sparse backend
    mask = ActiveMask.random(8, (7, 7), 0.6, generator=torch.Generator().manual_seed(1))
    conv = nn.Conv2d(3, 64, 1, stride=2, bias=False)
    masked = ss.create_backend("masked").convert(nn.Sequential(conv)).to(memory_format=torch.channels_last)
    images = torch.randn(8, 3, 224, 224).contiguous(memory_format=torch.channels_last) * mask.dense_at(1)
    for _ in range(3):
        masked(MaskedDense(images.clone().requires_grad_(True), mask, 1)).data.square().sum().backward()
    sparse = ss.create_backend("sparse").convert(nn.Sequential(nn.Conv2d(3, 64, 1, stride=2, bias=False)))
    sparse[0].pin_kernel("cpu", torch.float32, "dense")
    rows = SparseRows.from_image(torch.randn(8, 3, 224, 224), mask)
    for _ in range(3):
        sparse(SparseRows(rows.data.clone().requires_grad_(True), mask, 1)).data.square().sum().backward()
    print("survived", worst)
""")


def test_strided_one_by_one_conv_on_few_nhwc_channels_neither_crashes_nor_corrupts_gradients():
    run = subprocess.run([sys.executable, "-c", REGRESSION], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "survived" in run.stdout, (
        f"exit status {run.returncode} (negative: killed by signal {-run.returncode})\n"
        f"{run.stdout}\n{run.stderr[-3000:]}")
