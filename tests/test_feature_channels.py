"""Channel bookkeeping on feature maps: torch.cat / split / chunk / slices along channels, sums started at 0.

Concatenating nets (CSPNet, DenseNet, VoVNet, Res2Net) call these in their own forward code; the
whole encoders are compared with ``masked`` in tests/test_equivalence_encoders.py.
"""
import copy

import pytest
import torch

from timm.layers import Mlp, RmsNorm
from timm.layers.grn import GlobalResponseNorm
from timm.layers.mlp import GlobalResponseNormMlp

import spark_sparse as ss
from spark_sparse import ActiveMask, MaskedDense, SparseRows

CHANNELS = (3, 5)


@pytest.fixture
def mask() -> ActiveMask:
    return ActiveMask.random(2, (2, 3), 0.5, downsample_ratio=4, generator=torch.Generator().manual_seed(0))


def _maps(kind: type, mask: ActiveMask) -> list:
    """Two feature maps of ``kind`` at stride 2 (3 and 5 channels), from the same dense values."""
    site = mask.dense_at(2)
    dense = [torch.randn(2, c, *site.shape[2:], generator=torch.Generator().manual_seed(c)) * site for c in CHANNELS]
    if kind is MaskedDense:
        return [MaskedDense(d, mask, 2) for d in dense]
    b, y, x = mask.coords_at(2).unbind(1)
    return [SparseRows(d.permute(0, 2, 3, 1)[b, y, x], mask, 2) for d in dense]


@pytest.mark.parametrize("kind", [MaskedDense, SparseRows])
@pytest.mark.parametrize("dim", [1, -3])
def test_cat_then_split_and_chunk_give_the_channel_groups_back_at_the_same_sites(kind, dim, mask):
    a, b = _maps(kind, mask)
    joined = torch.cat([a, b], dim)
    assert isinstance(joined, kind) and joined.stride == 2 and joined.mask is mask and joined.channels == 8
    torch.testing.assert_close(joined.to_dense(), torch.cat([a.to_dense(), b.to_dense()], 1), rtol=0, atol=0)
    assert torch.equal(torch.concat([a, b], dim=dim).data, joined.data)
    assert torch.equal(torch.cat(tensors=[a, b], dim=dim).data, joined.data)
    for parts in (joined.split(list(CHANNELS), dim=dim), torch.split(joined, list(CHANNELS), dim),
                  joined.split(4, dim)[:1] + (joined.split([4, 4], dim)[1],)):
        assert torch.equal(torch.cat([p.to_dense() for p in parts], 1), joined.to_dense())
    first, second = joined.split(list(CHANNELS), dim=dim)
    assert torch.equal(first.data, a.data) and torch.equal(second.data, b.data)
    halves = torch.chunk(joined, 2, dim)
    assert [h.channels for h in halves] == [4, 4] == [h.channels for h in joined.chunk(2, dim=dim)]


def test_both_representations_agree_on_every_channel_operation(mask):
    dense, rows = _maps(MaskedDense, mask), _maps(SparseRows, mask)
    for joined_dense, joined_rows in ((torch.cat(dense, 1), torch.cat(rows, 1)),
                                      (torch.cat(dense, 1).split(2, 1)[1], torch.cat(rows, 1).split(2, 1)[1])):
        assert torch.equal(joined_dense.to_dense(), joined_rows.to_dense())
        site = mask.dense_at(2).expand_as(joined_dense.to_dense())
        assert torch.all(joined_dense.to_dense()[~site] == 0)


@pytest.mark.parametrize("call", [
    lambda a, b: torch.cat([a, b]),                     # torch's default dim 0: the batch
    lambda a, b: torch.cat([a, b], 2),
    lambda a, b: a.split(1),
    lambda a, b: torch.split(a, 1, -1),
    lambda a, b: a.chunk(2),
])
@pytest.mark.parametrize("kind", [MaskedDense, SparseRows])
def test_any_dimension_but_channels_is_refused(kind, call, mask):
    a, b = _maps(kind, mask)
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"along channels only \(dim=1\)"):
        call(a, b)


@pytest.mark.parametrize("kind", [MaskedDense, SparseRows])
def test_cat_refuses_tensors_other_strides_and_other_torch_functions(kind, mask):
    a, b = _maps(kind, mask)
    with pytest.raises(ss.UnsupportedFeatureOperation, match="feature maps only, got: .*Tensor"):
        torch.cat([a, torch.zeros(1)], 1)
    with pytest.raises(ValueError, match="cannot concatenate feature maps of different kinds, masks or strides"):
        torch.cat([a, kind(b.data, mask, 4)], 1)
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"torch\.mean is not defined on SparK feature maps"):
        torch.mean(a)
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"F\.dropout is not defined"):
        torch.nn.functional.dropout(a, 0.5)
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"F\.interpolate is not defined"):
        torch.nn.functional.interpolate(a, scale_factor=2.0)
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"torch\.sigmoid is not defined"):
        torch.sigmoid(a)
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"F\.relu is not defined on SparK feature maps; in a "
                                                             r"block of your own, call it as a child module "
                                                             r"\(nn\.ReLU\(\) in __init__"):
        torch.nn.functional.relu(a)


@pytest.mark.parametrize("kind", [MaskedDense, SparseRows])
def test_sums_started_at_zero_are_exact_and_other_numbers_are_refused(kind, mask):
    a, _ = _maps(kind, mask)
    total = 0
    total += a
    assert total is a and (a + 0) is a and (0.0 + a) is a
    assert (a - 0) is a and torch.equal((0 - a).to_dense(), -a.to_dense())
    for number in (1, 0.5, False):
        with pytest.raises(ss.UnsupportedFeatureOperation, match=r"cannot add .* to a SparK feature map: it would "
                                                                 r"make the masked sites non-zero"):
            a + number
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"cannot subtract the number 0\.1 from a SparK"):
        a - 0.1
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"cannot subtract a SparK feature map from the number 1"):
        1 - a
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"cannot add a tensor of shape \(1, 4, 1, 1\) to"):
        a + torch.ones(1, 4, 1, 1)
    view = a.permute(0, 2, 3, 1)                                # a channels-last view follows the same rules
    assert (view + 0).permute(0, 3, 1, 2) is a and (0 + view).permute(0, 3, 1, 2) is a
    assert (view - 0).permute(0, 3, 1, 2) is a and torch.equal((0 - view).permute(0, 3, 1, 2).to_dense(), -a.to_dense())
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"make the masked sites non-zero"):
        view + 0.5
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"cannot subtract the number 0\.1 from a SparK"):
        view - 0.1
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"cannot subtract a SparK feature map from the number 1"):
        1 - view


@pytest.mark.parametrize("kind", [MaskedDense, SparseRows])
def test_negation_and_division_by_a_scalar_keep_the_sites(kind, mask):
    a, _ = _maps(kind, mask)
    for result, expected in ((-a, -a.to_dense()), (a / 4, a.to_dense() / 4), (a / torch.tensor(2.0), a.to_dense() / 2)):
        assert isinstance(result, kind) and result.mask is mask and result.stride == a.stride
        assert torch.equal(result.to_dense(), expected)
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"divided by one scalar .* not by a tensor of shape"):
        a / torch.ones(1, a.channels, 1, 1)
    view = a.permute(0, 2, 3, 1)
    assert torch.equal((-view).permute(0, 3, 1, 2).to_dense(), -a.to_dense())
    assert torch.equal((view / 4).permute(0, 3, 1, 2).to_dense(), a.to_dense() / 4)


@pytest.mark.parametrize("kind", [MaskedDense, SparseRows])
def test_channel_slices_keep_the_sites_and_anything_else_is_refused(kind, mask):
    joined = torch.cat(_maps(kind, mask), 1)
    for index, channels in (((slice(None), slice(None, 3)), slice(0, 3)),
                            ((slice(None), slice(2, 7), slice(None), slice(None)), slice(2, 7)),
                            ((slice(None), slice(1, None, 2), Ellipsis), slice(1, None, 2))):
        part = joined[index]
        assert isinstance(part, kind) and part.mask is mask and part.stride == 2
        assert torch.equal(part.to_dense(), joined.to_dense()[:, channels])
    for index in (0, slice(None), (slice(None), 1), (0, slice(None)), (slice(None), slice(0, 3), slice(0, 1)),
                  (slice(None), slice(0, 3), slice(None), slice(None), slice(None))):
        with pytest.raises(ss.UnsupportedFeatureOperation, match="selects channels only"):
            joined[index]


def test_contiguous_keeps_the_feature_map(mask):
    rows = _maps(SparseRows, mask)[0]
    assert rows.contiguous() is rows


@pytest.mark.parametrize("kind", [MaskedDense, SparseRows])
def test_scalar_factors_scale_every_site_and_in_place_scaling_rebinds_the_data(kind, mask):
    a, _ = _maps(kind, mask)
    gain = torch.tensor(0.25, requires_grad=True)
    for scaled, factor in ((a * 2.0, 2.0), (3 * a, 3.0), (a * gain, 0.25), (a * torch.tensor([1.5]), 1.5)):
        assert isinstance(scaled, kind) and scaled.mask is mask and scaled.stride == 2
        assert torch.equal(scaled.to_dense(), a.to_dense() * factor)
    original = a.data
    out = a.mul_(gain)
    assert out is a and torch.equal(original, _maps(kind, mask)[0].data)       # the old tensor is untouched
    assert torch.equal(a.to_dense().detach(), _maps(kind, mask)[0].to_dense() * 0.25)
    a.data.sum().backward()
    assert gain.grad is not None and float(gain.grad) != 0.0


@pytest.mark.parametrize("kind", [MaskedDense, SparseRows])
def test_factors_other_than_one_scalar_are_refused(kind, mask):
    a, b = _maps(kind, mask)
    for factor in (torch.ones(3), torch.ones(1, 4, 1, 1), torch.ones(2, 3, 1, 1), torch.ones(1, 3, 2, 1), "2"):
        with pytest.raises(ss.UnsupportedFeatureOperation, match=r"one scalar .* per-channel factor .* map of the same"):
            a * factor
    with pytest.raises(ss.UnsupportedFeatureOperation,
                       match=r"site by site only with the same channels or one channel in either, not 3 and 5"):
        a * b


@pytest.mark.parametrize("kind", [MaskedDense, SparseRows])
def test_a_one_channel_map_multiplies_every_channel_of_its_site(kind, mask):
    """FocalNet's gates ``ctx * gates[:, l:l + 1]``: NCHW broadcasting over channels, either way round."""
    _, b = _maps(kind, mask)
    gate = b[:, 2:3]
    for product in (b * gate, gate * b):
        assert isinstance(product, kind) and product.channels == b.channels
        torch.testing.assert_close(product.to_dense(), b.to_dense() * gate.to_dense(), rtol=0, atol=0)


@pytest.mark.parametrize("kind", [MaskedDense, SparseRows])
def test_two_maps_of_the_same_sites_multiply_site_by_site(kind, mask):
    """StarNet's ``act(x1) * x2``: the product of the dense maps, masked sites 0, gradients to both."""
    _, b = _maps(kind, mask)
    c = b.with_data((b.data * 0.5 - 1.0 if kind is SparseRows else (b.data * 0.5 - 1.0) * mask.dense_at(2)))
    b.data.requires_grad_(True), c.data.requires_grad_(True)
    product = b * c
    assert isinstance(product, kind) and product.mask is mask and product.stride == 2
    torch.testing.assert_close(product.to_dense(), b.to_dense() * c.to_dense(), rtol=0, atol=0)
    site = mask.dense_like(product.to_dense()).expand_as(product.to_dense())
    assert torch.all(product.to_dense()[~site] == 0) and product.to_dense()[site].abs().sum() > 0
    product.data.sum().backward()
    assert torch.equal(b.data.grad, c.data.detach()) and torch.equal(c.data.grad, b.data.detach())
    other_stride = kind(b.data.detach(), mask, 4) if kind is SparseRows else MaskedDense(b.data.detach(), mask, 4)
    with pytest.raises(ValueError, match="cannot multiply feature maps of different kinds, masks or strides"):
        b * other_stride


@pytest.mark.parametrize("kind", [MaskedDense, SparseRows])
def test_two_maps_of_the_same_sites_subtract_and_others_are_refused(kind, mask):
    """PoolFormer's ``pool(x) - x``: the difference of the dense maps, masked sites 0."""
    a, b = _maps(kind, mask)
    c = b.with_data(b.data * 0.5 - 1.0 if kind is SparseRows else (b.data * 0.5 - 1.0) * mask.dense_at(2))
    difference = b - c
    assert isinstance(difference, kind) and difference.mask is mask and difference.stride == 2
    torch.testing.assert_close(difference.to_dense(), b.to_dense() - c.to_dense(), rtol=0, atol=0)
    with pytest.raises(ss.FeatureMapMismatch, match="cannot subtract feature maps of different kinds, masks or strides"):
        b - kind(b.data, mask, 4)
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"cannot subtract a tensor of shape .* from a SparK"):
        b - b.to_dense()


@pytest.mark.parametrize("kind", [MaskedDense, SparseRows])
def test_a_per_channel_factor_written_in_nchw_scales_each_channel(kind, mask):
    a, _ = _maps(kind, mask)
    gamma = torch.tensor([0.5, -2.0, 3.0])
    for scaled in (a.mul(gamma.reshape(1, -1, 1, 1)), a * gamma.view(3, 1, 1), gamma.view(1, 3, 1, 1) * a):
        assert isinstance(scaled, kind) and scaled.mask is mask and scaled.stride == 2
        torch.testing.assert_close(scaled.to_dense(), a.to_dense() * gamma.view(1, 3, 1, 1), rtol=0, atol=0)


@pytest.mark.parametrize("kind", [MaskedDense, SparseRows])
def test_a_tensor_method_a_map_does_not_define_is_refused_by_name(kind, mask):
    """FasterNet's inference-only ``x.clone()`` and a reshaping ``x.view(...)`` get the refusal of
    an unsupported torch function, naming the method; other missing names stay plain AttributeErrors."""
    from spark_sparse.features import UnsupportedFeatureMethod

    a, _ = _maps(kind, mask)
    for call in (lambda: a.clone(), lambda: a.view(2, -1)):
        with pytest.raises(ss.UnsupportedFeatureOperation, match=r"Tensor\.(clone|view) is not defined on SparK"):
            call()
    assert not hasattr(a, "clone")                              # still an AttributeError for hasattr
    with pytest.raises(AttributeError) as missing:
        a.no_such_attribute
    assert not isinstance(missing.value, UnsupportedFeatureMethod)
    assert torch.equal(copy.deepcopy(a).data, a.data)           # copy's dunder lookups are untouched


# ---------------------------------------------------------------- channels-last views (MambaOut's NHWC blocks)
def _nhwc(dense: torch.Tensor) -> torch.Tensor:
    return dense.permute(0, 2, 3, 1)


@pytest.mark.parametrize("kind", [MaskedDense, SparseRows])
def test_a_channels_last_view_is_the_same_map_and_permutes_back_to_it(kind, mask):
    from spark_sparse.features import ChannelsLastView

    a, _ = _maps(kind, mask)
    for view in (a.permute(0, 2, 3, 1), a.permute((0, 2, 3, 1)), a.permute(0, -2, -1, 1), torch.permute(a, (0, 2, 3, 1))):
        assert isinstance(view, ChannelsLastView) and view.mask is mask and view.stride == 2 and view.channels == 3
        assert view.permute(0, 3, 1, 2) is a and torch.permute(view, (0, 3, 1, 2)) is a
    for order in ((0, 1, 3, 2), (0, 3, 1, 2), (1, 0, 2, 3)):
        with pytest.raises(ss.UnsupportedFeatureOperation, match=r"permuted to channels last only"):
            a.permute(*order)
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"back to channels first only"):
        a.permute(0, 2, 3, 1).permute(0, 1, 3, 2)


@pytest.mark.parametrize("kind", [MaskedDense, SparseRows])
def test_a_channels_last_block_computes_on_the_view_what_it_computes_on_the_nhwc_tensor(kind, mask):
    """MambaOut's gated block in miniature: Linear, split along dim=-1, a gate product, cat along dim=-1,
    a per-channel (C,) factor, a residual add; compared with the same code on the dense NHWC tensor."""
    a, _ = _maps(kind, mask)
    site = _nhwc(mask.dense_at(2).float())
    fc = torch.nn.Linear(3, 6)
    gamma = torch.tensor([0.5, -1.0, 2.0])

    def block(x, linear, act):
        g, i, c = torch.split(linear(x), (3, 1, 2), dim=-1)
        return act(g) * torch.cat((i, c), dim=-1) * gamma + x

    gelu = torch.nn.functional.gelu
    view = a.permute(0, 2, 3, 1)
    ours = block(view, lambda v: v.per_site(fc), lambda v: v.elementwise(gelu)).permute(0, 3, 1, 2).to_dense()
    dense = block(_nhwc(a.to_dense()), lambda t: fc(t) * site, gelu)      # SparK masks a Linear's bias
    torch.testing.assert_close(ours, dense.permute(0, 3, 1, 2) * site.permute(0, 3, 1, 2), rtol=1e-6, atol=1e-6)
    assert torch.all(ours[~mask.dense_at(2).expand_as(ours)] == 0)


@pytest.mark.parametrize("kind", [MaskedDense, SparseRows])
def test_a_channels_last_view_refuses_what_would_read_another_dimension(kind, mask):
    """Per-channel factors are (C,) on a view and (C, 1, 1) on a map, each refused on the other; what a
    conv, pool or BatchNorm reads of a map is refused on a view; a channels-first norm refuses a view."""
    from timm.layers import LayerNorm, LayerNorm2d

    a, b = _maps(kind, mask)
    view = a.permute(0, 2, 3, 1)
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"per-channel factor of shape \(3,\)"):
        view * torch.ones(3, 1, 1)
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"per-channel factor of shape \(1, 3, 1, 1\)"):
        a * torch.ones(3)
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"along channels only \(dim=-1\), got dim=1"):
        torch.split(view, 1, dim=1)
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"'data' of a channels-last view .* permute back"):
        view.data
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"cannot add a channels-last view .* and a"):
        view + a
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"cannot multiply a channels-last view .* and a"):
        view * a
    backend = ss.create_backend("masked" if kind is MaskedDense else "sparse")
    for layer in (torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3), LayerNorm2d(3)):
        with pytest.raises(ss.UnsupportedFeatureOperation, match=r"channels-last view"):
            backend.convert(torch.nn.Sequential(layer))(view)
    normed = backend.convert(torch.nn.Sequential(LayerNorm(3)))(view)          # a channels-last LayerNorm
    torch.testing.assert_close(normed.permute(0, 3, 1, 2).to_dense(),
                               backend.convert(torch.nn.Sequential(LayerNorm2d(3)))(a).to_dense())


#: channels-last layers as a user's forward calls them (timm's Mlp: a container of Linear layers)
CHANNELS_LAST_LAYERS = {
    "LayerNorm": lambda: torch.nn.LayerNorm(16),
    "Linear": lambda: torch.nn.Linear(16, 16),
    "RmsNorm": lambda: RmsNorm(16),
    "GlobalResponseNorm": lambda: GlobalResponseNorm(16, channels_last=True),
    "GlobalResponseNormMlp": lambda: GlobalResponseNormMlp(16, 32),
    "timm_Mlp": lambda: Mlp(16, 32),
}


class _UsersChannelsLastEncoder(torch.nn.Module):
    """A user's encoder with a layer over channels: right (``permute`` to NHWC first) or wrong (on the NCHW map,
    where the dense model computes over the width: it runs, as the width here equals the channels)."""

    def __init__(self, layer: torch.nn.Module, permute: bool):
        super().__init__()
        self.permute = permute
        self.stem, self.layer, self.down = torch.nn.Conv2d(3, 16, 4, 4), layer, torch.nn.Conv2d(16, 32, 2, 2)

    def get_downsample_ratio(self):
        return 8

    def get_feature_map_channels(self):
        return [16, 32]

    def forward(self, x, hierarchical=False):
        a = self.stem(x)
        a = self.layer(a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if self.permute else self.layer(a)
        return [a, self.down(a)]


@pytest.mark.parametrize("layer", list(CHANNELS_LAST_LAYERS))
@pytest.mark.parametrize("backend", ["masked", "sparse"])      # the layers and their checks are every backend's
def test_a_users_layer_over_the_last_dimension_takes_a_channels_last_view_and_refuses_an_nchw_map(backend, layer):
    """On the view: the dense model's features with every patch visible, masked's loss with a mask. On the map:
    refused, naming the permute."""
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.manual_seed(0)
    encoder = _UsersChannelsLastEncoder(CHANNELS_LAST_LAYERS[layer](), permute=True).double()
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.normal_(0, 0.5)           # GRN's zero-initialised weight and bias, too
        dense = encoder(images)
    reference = ss.create_spark(copy.deepcopy(encoder), "masked", input_size=64).double()
    spark = ss.create_spark(copy.deepcopy(encoder), backend, input_size=64).double()
    spark.load_state_dict(reference.state_dict())
    visible = [f.to_dense() for f in spark.encode(images, ActiveMask.full(2, (2, 2)))]
    for got, want in zip(visible, dense):
        torch.testing.assert_close(got, want)
    mask = reference.mask(2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(spark(images, mask), reference(images, mask), rtol=1e-9, atol=1e-12)
    encoder.permute = False
    wrong = ss.create_spark(encoder, backend, input_size=64).double()
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"in module 'layer.*' .* acts on the last dimension, "
                                                             r"but it was given a channels-first \(NCHW\) feature "
                                                             r"map.*x\.permute\(0, 2, 3, 1\)"):
        wrong(images, mask)
