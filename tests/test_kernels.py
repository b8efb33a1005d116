"""Our kernels against the reference ``gather`` kernel, every conv shape and dtype; custom-op checks."""
import dataclasses

import pytest
import torch

from spark_sparse.kernels import ConvCall, ConvSpec, get_kernel, list_kernels
from spark_sparse.kernels.gemm import gather_depthwise_conv, gather_gemm_conv, transposed_table
from spark_sparse import ActiveMask

# (name, in_ch, out_ch, kernel, stride, padding, dilation, groups, in_stride)
SHAPES = [
    ("1x1", 16, 24, 1, 1, 0, 1, 1, 4),
    ("3x3", 16, 24, 3, 1, 1, 1, 1, 4),
    ("7x7", 8, 8, 7, 1, 3, 1, 1, 8),
    ("3x3_s2", 16, 24, 3, 2, 1, 1, 1, 4),
    ("1x1_s2", 16, 24, 1, 2, 0, 1, 1, 8),
    ("2x2_s2", 16, 24, 2, 2, 0, 1, 1, 8),
    ("stem7x7_s2", 3, 16, 7, 2, 3, 1, 1, 1),
    ("stem4x4_s4", 3, 16, 4, 4, 0, 1, 1, 1),
    ("3x3_dilated", 16, 16, 3, 1, 2, 2, 1, 4),
    ("depthwise7x7", 16, 16, 7, 1, 3, 1, 16, 4),
    ("depthwise3x3_s2", 16, 16, 3, 2, 1, 1, 16, 4),
    # TensorFlow "SAME" padding: the leading padding below, the trailing one larger
    ("same3x3_s2", 16, 24, 3, 2, 0, 1, 1, 4),
    ("same_depthwise5x5_s2", 16, 16, 5, 2, 1, 1, 16, 4),
    ("same_stem3x3_s2", 3, 16, 3, 2, 0, 1, 1, 1),
]
#: errors relative to the same sums taken over absolute values (the standard bound for a rounded
#: sum): bf16 / fp16 keep 8 / 11 mantissa bits, so a few units of 2^-8 / 2^-11 per element
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def _case(shape, dtype, seed=0):
    name, cin, cout, k, s, p, d, g, in_stride = shape
    mask = ActiveMask.random(2, (3, 4), 0.5, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(mask.num_active(in_stride), cin, generator=gen).to(dtype)
    w = (torch.randn(cout, cin // g, k, k, generator=gen) / (cin // g * k * k) ** 0.5).to(dtype)
    b = torch.randn(cout, generator=gen).to(dtype)
    call = ConvCall(mask, in_stride, in_stride * s, (k, k), (p, p), (d, d), g)
    return x, w, b, call


def _skip_unless_supported(kernel, shape, dtype):
    name, cin, cout, k, s, p, d, g, _ = shape
    reasons = list_kernels()[kernel].not_supported_reasons(ConvSpec(cin, cout, (k, k), (s, s), (p, p), (d, d), g, True,
                                                                    "cpu", dtype))
    if reasons:
        pytest.skip(f"{kernel} declares it cannot run this: {'; '.join(reasons)}")


def _run(kernel, x, w, b, call, absolute=False):
    """Output and gradients; with ``absolute`` the same sums over |inputs| and |probe| (error scales)."""
    x, w, b = (t.abs() if absolute else t for t in (x, w, b))
    x, w, b = (t.clone().requires_grad_(True) for t in (x, w, b))
    out = get_kernel(kernel).conv(x, w, b, call)
    probe = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out).to(out.dtype)
    (out * (probe.abs() if absolute else probe)).sum().backward()
    return out.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("kernel", [name for name in list_kernels() if name != "gather"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=lambda d: str(d).replace("torch.", ""))
def test_kernel_matches_the_reference_forward_and_backward(kernel, shape, dtype):
    _skip_unless_supported(kernel, shape, dtype)
    x, w, b, call = _case(shape, dtype)
    reference = _run("gather", x.double(), w.double(), b.double(), call)
    scales = _run("gather", x.double(), w.double(), b.double(), call, absolute=True)
    got = _run(kernel, x, w, b, call)
    for what, r, scale, g in zip(("output", "grad input", "grad weight", "grad bias"), reference, scales, got):
        excess = (g.double() - r).abs() - TOLERANCE[dtype] * (scale + 1e-30)
        assert float(excess.max()) <= 0, f"{what}: max error {float((g.double() - r).abs().max()):.3g}"


@pytest.mark.parametrize("kernel", list(list_kernels()))
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], SHAPES[9], ("grouped3x3", 16, 24, 3, 1, 1, 1, 4, 4)],
                         ids=["1x1", "3x3_s2", "depthwise7x7", "grouped3x3"])
def test_kernel_runs_a_batch_with_every_patch_masked(kernel, shape):
    """No active rows (a user's all-masked mask): empty outputs and input gradient, zero weight and bias
    gradients, as SparK's masked conv gives (ME 0.5.4 itself crashes the process on an empty map)."""
    _skip_unless_supported(kernel, shape, torch.float32)
    _, cin, cout, k, s, p, d, g, in_stride = shape
    call = ConvCall(ActiveMask(torch.zeros(2, 1, 3, 4, dtype=torch.bool)), in_stride, in_stride * s, (k, k), (p, p),
                    (d, d), g)
    x, w, b = torch.randn(0, cin), torch.randn(cout, cin // g, k, k), torch.randn(cout)
    out, grad_x, grad_w, grad_b = _run(kernel, x, w, b, call)
    assert out.shape == (0, cout) and grad_x.shape == (0, cin)
    assert not grad_w.any() and not grad_b.any()


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_transposed_table_is_the_full_inverse_of_the_neighbour_table(shape):
    """Every (output row, tap) -> input row entry appears reversed, no (input row, tap) is claimed twice,
    and every other entry of the transposed table is the 'no output' sentinel N_out."""
    _, _, _, call = _case(shape, torch.float32)
    table, table_t = call.neighbours(), transposed_table(call)
    n_out, taps = table.shape
    expected = torch.full((call.num_in, taps), n_out, dtype=torch.long)
    for o in range(n_out):
        for k in range(taps):
            i = int(table[o, k])
            if i < call.num_in:                       # masked (N_in) and padding (N_in + 1) taps have no input row
                assert int(expected[i, k]) == n_out, f"input row {i} tap {k} feeds two output rows"
                expected[i, k] = o
    assert table_t.shape == expected.shape and torch.equal(table_t, expected)


@pytest.mark.parametrize("op,shape", [(gather_gemm_conv, SHAPES[1]), (gather_gemm_conv, SHAPES[3]),
                                      (gather_depthwise_conv, SHAPES[9])], ids=["gemm", "gemm_s2", "depthwise"])
def test_custom_ops_pass_opcheck(op, shape):
    x, w, _, call = _case(shape, torch.float64)
    args = (x.requires_grad_(True), w.requires_grad_(True), call.neighbours(), transposed_table(call))
    torch.library.opcheck(op, args)


def test_torch_compile_traces_a_sparse_conv_without_graph_breaks():
    import torch.nn as nn
    from torch._dynamo.utils import counters

    import spark_sparse as ss
    from spark_sparse import SparseRows

    torch._dynamo.reset()
    conv = ss.create_backend("sparse").convert(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1)))
    mask = ActiveMask.random(2, (2, 2), 0.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(mask.num_active(4), 8, requires_grad=True)

    def loss(rows):
        return conv(SparseRows(rows, mask, 4)).data.square().sum()

    eager = loss(x)
    (grad_eager,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(loss)(x)
    (grad_compiled,) = torch.autograd.grad(compiled, x)
    assert not counters["graph_break"]
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(grad_compiled, grad_eager)


def _dense_masked_conv(x, w, b, call):
    """SparK's masked convolution, read at the active output sites: the ground truth of every kernel.

    ``call.padding`` zeros before each axis, and after it as many as the output grid (the input's
    downsampled by the stride) needs: the symmetric padding of ``nn.Conv2d`` or TensorFlow's "SAME".
    """
    site_in, site_out = call.mask.dense_at(call.in_stride)[:, 0], call.mask.dense_at(call.out_stride)[:, 0]
    dense = x.new_zeros(*site_in.shape, x.shape[1]).index_put((site_in,), x).permute(0, 3, 1, 2)
    step = call.out_stride // call.in_stride
    (top, left), (kh, kw), (dh, dw) = call.padding, call.kernel_size, call.dilation
    bottom = (site_out.shape[1] - 1) * step + (kh - 1) * dh + 1 - site_in.shape[1] - top
    right = (site_out.shape[2] - 1) * step + (kw - 1) * dw + 1 - site_in.shape[2] - left
    dense = torch.nn.functional.pad(dense, (left, right, top, bottom))
    out = torch.nn.functional.conv2d(dense, w, b, stride=step, dilation=call.dilation, groups=call.groups)
    assert out.shape[2:] == site_out.shape[1:]
    return out.permute(0, 2, 3, 1)[site_out]


@pytest.mark.parametrize("kernel", ["gather", "gemm", "dense"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_kernel_matches_dense_masked_convolution_fp64(kernel, shape):
    x, w, b, call = _case(shape, torch.float64, seed=3)
    want = _run_fn(_dense_masked_conv, x, w, b, call)
    got = _run_fn(get_kernel(kernel).conv, x, w, b, call)
    for what, g, r in zip(("output", "grad input", "grad weight", "grad bias"), got, want):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=0, msg=lambda m: f"{kernel} {what}: {m}")


def _run_fn(fn, x, w, b, call):
    x, w, b = (t.clone().requires_grad_(True) for t in (x, w, b))
    out = fn(x, w, b, call)
    probe = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * probe).sum().backward()
    return out.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("ties", [False, True], ids=["random", "many_ties"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_max_pool_op_matches_dense_max_pool_including_gradient_routing(ties, dtype):
    from spark_sparse.kernels.pooling import max_pool_rows

    mask = ActiveMask.random(2, (3, 4), 0.5, generator=torch.Generator().manual_seed(1))
    call = ConvCall(mask, 2, 4, (3, 3), (1, 1), (1, 1), 1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(call.num_in, 5, generator=gen)
    x = (x * 2).round().clamp(min=0) if ties else x                       # ReLU-like inputs: many equal maxima
    x = x.to(dtype).requires_grad_(True)
    reference = x.detach().double().requires_grad_(True)                  # the same values, exact sums
    site_in = mask.dense_at(2)[:, 0]
    dense = reference.new_zeros(*site_in.shape, 5).index_put((site_in,), reference).permute(0, 3, 1, 2)
    want = torch.nn.functional.max_pool2d(dense, 3, 2, 1).permute(0, 2, 3, 1)[mask.dense_at(4)[:, 0]]
    got = max_pool_rows(x, call.neighbours())
    torch.testing.assert_close(got, want.to(dtype), atol=0, rtol=0)
    probe = torch.linspace(-1, 1, got.numel(), dtype=torch.float64).view_as(got)
    (grad_want,) = torch.autograd.grad((want * probe).sum(), reference)
    (grad_got,) = torch.autograd.grad((got * probe.to(dtype)).sum(), x)
    # the same winners get the same gradients; overlapping windows' sums are rounded once (default
    # assert_close tolerances of the dtype, e.g. bf16 rtol 1.6e-2)
    torch.testing.assert_close(grad_got, grad_want.to(dtype))


def test_max_pool_op_passes_opcheck():
    from spark_sparse.kernels.pooling import gather_max_pool

    mask = ActiveMask.random(2, (3, 4), 0.5, generator=torch.Generator().manual_seed(1))
    call = ConvCall(mask, 2, 4, (3, 3), (1, 1), (1, 1), 1)
    x = torch.randn(call.num_in, 4, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(gather_max_pool, (x, call.neighbours()))


@pytest.mark.parametrize("kernel", [name for name, cls in list_kernels().items() if "cpu" in cls.REPRODUCIBLE_ON])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_kernels_that_claim_cpu_reproducibility_give_equal_bits_for_a_rebuilt_mask(kernel, shape):
    """Exact resume needs it: a resumed run rebuilds the mask (and every table or library state cached on
    it) from the same active patches. 'auto' only picks kernels that claim it on the CPU."""
    _skip_unless_supported(kernel, shape, torch.float32)
    x, w, b, call = _case(shape, torch.float32)
    first = _run(kernel, x, w, b, call)
    for _ in range(3):
        rebuilt = ActiveMask(call.mask.active.clone(), call.mask.downsample_ratio)
        again = _run(kernel, x, w, b, dataclasses.replace(call, mask=rebuilt))
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_rows_at_gives_the_same_gradient_every_run_where_threads_share_rows():
    """Exact resume needs bit-identical gradients. ``source[table]``'s backward (an accumulating
    index_put) adds a row that both CPU threads address in a different order from run to run (20
    different gradients in 20 runs for this random table); the kernels gather with ``rows_at``."""
    from spark_sparse.kernels.gather import rows_at

    gen = torch.Generator().manual_seed(0)
    source = torch.randn(789, 64, generator=gen, requires_grad=True)
    table = torch.randint(0, 789, (789, 9), generator=gen)
    upstream = torch.randn(789, 9, 64, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gradients = set()
        for _ in range(10):
            (grad,) = torch.autograd.grad((rows_at(source, table) * upstream).sum(), source)
            gradients.add(grad.numpy().tobytes())
    finally:
        torch.set_num_threads(threads)
    assert len(gradients) == 1
    assert torch.equal(rows_at(source, table), source[table])
