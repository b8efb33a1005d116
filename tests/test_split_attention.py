"""ResNeSt's SplitAttn and SKNet's SelectiveKernel on every backend (spark_sparse/models/split_attention.py).

Each converter equals ``masked`` on every sparse backend (fp64), squeezes over each image's active
sites only, is timm's layer when every site is visible, keeps timm's state-dict keys, and refuses a
DropBlock. The whole encoders are compared with ``masked`` in tests/test_equivalence_encoders.py.
"""
import copy

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import DropBlock2d, SelectiveKernel, SplitAttn

import spark_sparse as ss
from spark_sparse import ActiveMask, MaskedDense, SparseRows

from equivalence import assert_layer_pair_matches, run_layer_pair, sparse_backend_params
from test_equivalence_layers import randomized

FP64_TOLERANCE = 1e-10
ALL_BACKENDS = ["masked", "torch"]   # the reference and one true-sparse backend (the others are compared to masked)

# name -> (layer factory, input stride, input channels); 32 px images of 4x4 patches: 16 px maps at stride 8
LAYERS = {
    "split_attn_radix2": (lambda: SplitAttn(8, 8, radix=2, rd_channels=4, norm_layer=nn.BatchNorm2d), 8, 8),
    "split_attn_radix2_cardinality2": (
        lambda: SplitAttn(8, 8, groups=2, radix=2, rd_channels=4, norm_layer=nn.BatchNorm2d), 8, 8),
    "split_attn_radix4_stride2": (
        lambda: SplitAttn(8, 6, stride=2, radix=4, rd_channels=2, norm_layer=nn.BatchNorm2d), 8, 8),
    "split_attn_radix1_sigmoid": (lambda: SplitAttn(8, 8, radix=1, rd_channels=4, norm_layer=nn.BatchNorm2d), 8, 8),
    "selective_kernel_split_input": (lambda: SelectiveKernel(8, 8, rd_channels=4, split_input=True), 8, 8),
    "selective_kernel_whole_input_stride2": (
        lambda: SelectiveKernel(8, 6, stride=2, rd_channels=4, split_input=False), 8, 8),
    "selective_kernel_grouped_3_paths": (
        lambda: SelectiveKernel(6, 8, kernel_size=[3, 5, 7], groups=2, rd_channels=4, split_input=True), 8, 6),
}


def _random_mask() -> ActiveMask:
    return ActiveMask.random(2, (4, 4), 0.5, generator=torch.Generator().manual_seed(0))


def _uneven_mask() -> ActiveMask:
    """Two images of 3x3 patches, 4 and 2 visible: a mean over the whole map differs per image."""
    active = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    active[0, 0, 0, :2] = active[0, 0, 2, 1:] = True
    active[1, 0, 1, 1] = active[1, 0, 2, 0] = True
    return ActiveMask(active)


def _convert(backend: str, layer: nn.Module) -> nn.Module:
    return ss.create_backend(backend).convert(nn.Sequential(copy.deepcopy(layer)))


@pytest.mark.parametrize("backend", sparse_backend_params())
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_layer_matches_masked_in_fp64(backend, layer_name):
    factory, stride, channels = LAYERS[layer_name]
    mask = _random_mask()
    res = run_layer_pair(randomized(factory()), backend, mask, stride, channels, torch.float64)
    assert_layer_pair_matches(res, backend, mask, FP64_TOLERANCE)


def _branches(layer: nn.Module, x: torch.Tensor, site: torch.Tensor) -> list[torch.Tensor]:
    """The layer's branches, SparK's way: timm's dense feature-map modules (eval mode), masked after."""
    if isinstance(layer, SplitAttn):
        out = layer.act0(layer.bn0(layer.conv(x))) * site
        return list(out.chunk(layer.radix, dim=1))
    inputs = x.split(layer.in_channels // layer.num_paths, 1) if layer.split_input else [x] * layer.num_paths
    return [path(part) * site for path, part in zip(layer.paths, inputs)]


def _gates(layer: nn.Module, squeezed: torch.Tensor, batch: int, branches: int) -> torch.Tensor:
    """``[B, R, C]``: timm's attention on a squeezed ``[B, C, 1, 1]`` tensor."""
    if isinstance(layer, SplitAttn):
        attn = layer.fc2(layer.act1(layer.bn1(layer.fc1(squeezed))))
        return layer.rsoftmax(attn).view(batch, branches, -1)
    attn = layer.attn
    return torch.softmax(attn.fc_select(attn.act(attn.bn(attn.fc_reduce(squeezed)))).view(batch, branches, -1), 1)


@pytest.mark.parametrize("layer_name", ["split_attn_radix2_cardinality2", "selective_kernel_split_input"])
def test_the_squeeze_is_each_images_mean_over_its_active_sites(layer_name):
    factory, stride, channels = LAYERS[layer_name]
    mask, layer = _uneven_mask(), randomized(factory()).double().eval()
    site = mask.dense_at(stride)
    x = torch.randn(2, channels, *site.shape[-2:], dtype=torch.float64) * site
    out = _convert("masked", layer)(MaskedDense(x, mask, stride)).data
    with torch.no_grad():
        branches = _branches(layer, x, site)
        summed = sum(branches)
        counts = site.flatten(1).sum(1).to(x.dtype)
        active_mean = (summed.sum((2, 3)) / counts[:, None]).view(2, -1, 1, 1)
        for squeezed, should_match in ((active_mean, True), (summed.mean((2, 3), keepdim=True), False)):
            gates = _gates(layer, squeezed, 2, len(branches))
            want = sum(b * gates[:, r, :, None, None] for r, b in enumerate(branches))
            assert torch.allclose(out, want, rtol=1e-12, atol=1e-12) == should_match
    assert torch.all(out[~site.expand_as(out)] == 0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_with_every_site_visible_the_layer_is_timms_dense_layer(backend, layer_name):
    factory, stride, channels = LAYERS[layer_name]
    layer, mask = randomized(factory()).double(), ActiveMask.full(2, (2, 2))
    x = torch.randn(2, channels, 64 // stride, 64 // stride, dtype=torch.float64)
    fmap = (MaskedDense(x, mask, stride) if backend == "masked"
            else SparseRows(x.permute(0, 2, 3, 1).reshape(-1, channels), mask, stride))
    torch.testing.assert_close(_convert(backend, layer)(fmap).to_dense(), copy.deepcopy(layer)(x))


@pytest.mark.parametrize("backend", ["masked"] + sparse_backend_params())
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_converted_layer_keeps_timms_state_dict(backend, layer_name):
    layer = LAYERS[layer_name][0]()
    converted = _convert(backend, layer)[0]
    state = converted.state_dict()
    assert list(state) == list(layer.state_dict())
    assert all(torch.equal(state[key], value) for key, value in layer.state_dict().items())


@pytest.mark.parametrize("model", ["resnest14d", "skresnet18"])
def test_encoder_state_dict_loads_strictly_into_timm(model):
    spark = ss.create_spark(model, backend="torch", input_size=64, decoder_width=64)
    state = spark.encoder_state_dict()
    assert set(state) == set(timm.create_model(model, pretrained=False, num_classes=0).state_dict())
    timm.create_model(model, pretrained=False, num_classes=0).load_state_dict(state, strict=True)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_drop_block_in_split_attention_is_refused_naming_it(backend):
    layer = SplitAttn(8, 8, radix=2, rd_channels=4, norm_layer=nn.BatchNorm2d, drop_layer=DropBlock2d)
    with pytest.raises(ss.UnsupportedModuleError, match=r"0\.drop \(DropBlock2d\).*drop_block_rate=0"):
        _convert(backend, layer)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_drop_block_in_selective_kernel_paths_is_refused_naming_it(backend):
    layer = SelectiveKernel(8, 8, rd_channels=4, drop_layer=DropBlock2d)
    with pytest.raises(ss.UnsupportedModuleError, match=r"'0\.paths\.0\.bn\.drop'.*DropBlock2d"):
        _convert(backend, layer)
