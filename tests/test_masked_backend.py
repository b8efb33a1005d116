"""The ``masked`` backend reproduces SparK's semantics on timm encoders and custom models."""
import pytest
import timm
import torch
import torch.nn as nn

import spark_sparse as ss
from spark_sparse import ActiveMask, MaskedDense
from spark_sparse.backends import UnsupportedModuleError, create_backend
from spark_sparse.models import create_encoder

MODELS = ["resnet18", "resnet50", "convnext_tiny", "tiny_cnn"]


def _encode(model: str, images, mask, train=True):
    enc = create_encoder(model, drop_path_rate=0.0)
    dense_state = {k: v.clone() for k, v in enc.timm_state_dict().items()} if hasattr(enc, "timm_state_dict") else None
    create_backend("masked").convert(enc)
    enc.train(train)
    return enc, dense_state, [f.to_dense() for f in enc(MaskedDense.from_image(images, mask), hierarchical=True)]


@pytest.mark.parametrize("model", MODELS)
def test_masked_sites_are_exactly_zero_in_every_feature_map(model):
    images = torch.randn(2, 3, 96, 64)
    mask = ActiveMask.random(2, (3, 2), 0.6, generator=torch.Generator().manual_seed(0))
    enc, _, features = _encode(model, images, mask)
    assert [f.shape[1] for f in features] == enc.get_feature_map_channels()
    for fmap in features:
        site_mask = mask.dense_like(fmap).expand_as(fmap)
        assert torch.all(fmap[~site_mask] == 0)
        assert fmap[site_mask].abs().sum() > 0


@pytest.mark.parametrize("model", ["resnet18", "convnext_tiny"])
@pytest.mark.parametrize("train", [True, False])
def test_all_visible_mask_equals_the_plain_timm_model(model, train):
    images = torch.randn(2, 3, 64, 64)
    _, dense_state, features = _encode(model, images, ActiveMask.full(2, (2, 2)), train=train)
    reference = timm.create_model(model, pretrained=False, num_classes=0, drop_path_rate=0.0)
    reference.load_state_dict(dense_state)
    reference.train(train)
    expected = reference.forward_intermediates(images, intermediates_only=True)[-4:]
    for got, want in zip(features, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_batchnorm_statistics_come_from_active_sites_only():
    mask = ActiveMask.random(3, (2, 2), 0.5, generator=torch.Generator().manual_seed(2))
    x = torch.randn(3, 4, 16, 16) * 3 + 1
    site = mask.dense_at(4)
    bn = nn.BatchNorm2d(4, momentum=1.0)          # momentum 1: running stats = this batch's
    holder = nn.Sequential(bn)
    create_backend("masked").convert(holder)
    out = holder(MaskedDense(x * site, mask, 4)).data
    active = x.permute(0, 2, 3, 1)[site[:, 0]]      # [N, C] of the active sites only
    torch.testing.assert_close(holder[0].running_mean, active.mean(0))
    torch.testing.assert_close(holder[0].running_var, active.var(0, unbiased=True))
    normalised = (active - active.mean(0)) / torch.sqrt(active.var(0, unbiased=False) + bn.eps)
    torch.testing.assert_close(out.permute(0, 2, 3, 1)[site[:, 0]], normalised, atol=1e-5, rtol=1e-5)
    assert torch.all(out.permute(0, 2, 3, 1)[~site[:, 0]] == 0)


def test_convnext_block_branch_is_masked_before_the_residual_add():
    enc = create_encoder("convnext_tiny", drop_path_rate=0.0)
    block = enc.model.stages[0].blocks[0]
    holder = nn.Sequential(block)
    create_backend("masked").convert(holder)
    mask = ActiveMask.random(1, (2, 2), 0.5, generator=torch.Generator().manual_seed(0))
    site = mask.dense_at(4)
    x = torch.randn(1, 96, 16, 16) * site
    with torch.no_grad():
        holder[0].mlp.fc2.bias.fill_(1.0)          # a bias that would leak into masked sites
        out = holder(MaskedDense(x, mask, 4)).data
    assert torch.all(out[~site.expand_as(out)] == 0)


def test_unsupported_module_is_named():
    class Squeeze(nn.Module):   # global pooling over all sites: not expressible per site
        def forward(self, x):
            return x * x.mean((2, 3), keepdim=True)

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Squeeze())
    with pytest.raises(UnsupportedModuleError, match=r"'1'.*Squeeze.*register_container"):
        create_backend("masked").convert(model)


def test_activation_that_is_not_zero_preserving_is_refused():
    with pytest.raises(UnsupportedModuleError, match="Sigmoid"):
        create_backend("masked").convert(nn.Sequential(nn.Sigmoid()))


def test_plan_lists_every_conv_and_pool():
    spark = ss.create_spark("resnet18", input_size=64)
    plan = dict(spark.backend.plan(spark.encoder))
    assert "model.conv1" in plan and "model.maxpool" in plan and "model.layer4.1.conv2" in plan
    convs = sum(isinstance(m, nn.Conv2d) for m in spark.encoder.modules())
    assert sum(1 for name in plan if "pool" not in name) == convs
