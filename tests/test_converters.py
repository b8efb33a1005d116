"""Weight converters dense <-> spconv / MinkowskiEngine layouts: exact both ways, checked against the libraries."""
import pytest
import torch

from spark_sparse.kernels import ConvCall, get_kernel, list_kernels
from spark_sparse import ActiveMask

SPCONV = list_kernels()["spconv"]
MINKOWSKI = list_kernels()["minkowski"]
needs_spconv = pytest.mark.skipif(not SPCONV.availability()[0], reason=SPCONV.availability()[1])
needs_minkowski = pytest.mark.skipif(not MINKOWSKI.availability()[0], reason=MINKOWSKI.availability()[1])

SHAPES = [(12, 8, 3, 3), (12, 8, 1, 1), (6, 4, 7, 7), (8, 3, 4, 4), (5, 3, 2, 3)]


@pytest.mark.parametrize("shape", SHAPES)
def test_spconv_layout_round_trips_exactly(shape):
    from spark_sparse.kernels.spconv_kernel import from_native, to_native
    w = torch.randn(shape)
    assert torch.equal(from_native(to_native(w)), w)
    if shape[2:] == (1, 1):   # spconv's 1x1 special case: the stored tensor is the [in, out] matrix
        assert torch.equal(to_native(w).reshape(shape[1], shape[0]), w[:, :, 0, 0].t())
    else:                     # KRSC
        assert torch.equal(to_native(w)[:, 1 % shape[2], 0, 2 % shape[1]], w[:, 2 % shape[1], 1 % shape[2], 0])


@pytest.mark.parametrize("shape", SHAPES)
def test_minkowski_layout_round_trips_exactly(shape):
    from spark_sparse.kernels.minkowski_kernel import from_native, to_native
    w = torch.randn(shape)
    assert torch.equal(from_native(to_native(w), shape[2:]), w)
    if shape[2:] != (1, 1):   # offset index ky + kh * kx: the first spatial axis varies fastest
        kh = shape[2]
        assert torch.equal(to_native(w)[1 + kh * 0], w[:, :, 1, 0].t())
        assert torch.equal(to_native(w)[0 + kh * 1], w[:, :, 0, 1].t())


def test_minkowski_depthwise_layout_round_trips_exactly():
    from spark_sparse.kernels.minkowski_kernel import from_native, to_native
    w = torch.randn(6, 1, 7, 7)
    assert to_native(w, depthwise=True).shape == (49, 6)
    assert torch.equal(from_native(to_native(w, depthwise=True), (7, 7), depthwise=True), w)


def _sparse_input(channels=8, seed=0):
    mask = ActiveMask.random(2, (3, 3), 0.5, generator=torch.Generator().manual_seed(seed))
    x = torch.randn(mask.num_active(8), channels, generator=torch.Generator().manual_seed(seed))
    return mask, x


@needs_spconv
@pytest.mark.parametrize("k", [1, 3])
def test_spconv_module_with_converted_weights_computes_our_kernel(k):
    """spconv's own SubMConv2d holding ``to_native(w)`` equals our kernel: the layout facts hold."""
    import spconv.pytorch as spconv
    from spark_sparse.kernels.spconv_kernel import to_native
    mask, x = _sparse_input()
    w = torch.randn(12, 8, k, k)
    module = spconv.SubMConv2d(8, 12, k, padding=k // 2, bias=False)
    module.weight.data.copy_(to_native(w))
    coords = mask.coords_at(8).int().contiguous()
    with torch.no_grad():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            theirs = module(spconv.SparseConvTensor(x, coords, [12, 12], 2)).features
        finally:
            torch.set_num_threads(threads)
    ours = get_kernel("spconv").conv(x, w, None, ConvCall(mask, 8, 8, (k, k), (k // 2, k // 2), (1, 1), 1))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@needs_minkowski
def test_minkowski_module_with_converted_weights_computes_our_kernel():
    from spark_sparse.kernels.minkowski_kernel import MINKOWSKI, to_native

    me = MINKOWSKI.get()[0]
    mask, x = _sparse_input()
    w = torch.randn(12, 8, 3, 3)
    module = me.MinkowskiConvolution(8, 12, kernel_size=3, dimension=2)
    module.kernel.data.copy_(to_native(w))
    coords = mask.coords_at(8).clone()
    coords[:, 1:] *= 8
    st = me.SparseTensor(x, coordinates=coords.int(), tensor_stride=8)
    with torch.no_grad():
        theirs = module(st)
    # ME may reorder rows: compare per coordinate
    ours = get_kernel("minkowski").conv(x, w, None, ConvCall(mask, 8, 8, (3, 3), (1, 1), (1, 1), 1))
    index = {tuple(c): i for i, c in enumerate(coords.tolist())}
    order = [index[tuple(c)] for c in theirs.C.tolist()]
    torch.testing.assert_close(ours[order], theirs.F, atol=1e-4, rtol=1e-4)
