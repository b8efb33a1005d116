"""Whole encoders and short training runs on every sparse backend equal ``masked``."""
import pytest
import torch
from timm.optim import Lamb

import spark_sparse as ss

from equivalence import assert_encoder_matches_timm, max_errors, sparse_backend_params


def _pair(model, backend, size, dtype):
    torch.manual_seed(0)
    ref = ss.create_spark(model, input_size=size, drop_path_rate=0.0).to(dtype)
    other = ss.create_spark(model, backend=backend, input_size=size, drop_path_rate=0.0).to(dtype)
    other.load_state_dict(ref.state_dict())
    return ref, other


@pytest.mark.parametrize("backend", sparse_backend_params())
@pytest.mark.parametrize("model,size,batch", [("resnet18", 128, 2), ("resnet50", 96, 2), ("convnext_tiny", 96, 2)])
def test_encoder_features_loss_and_every_gradient_match(backend, model, size, batch):
    dtype = torch.float64
    ref, other = _pair(model, backend, size, dtype)
    images = torch.randn(batch, 3, size, size, dtype=dtype, generator=torch.Generator().manual_seed(1))
    mask = ref.mask(batch, generator=torch.Generator().manual_seed(2))
    feats_ref = [f.to_dense() for f in ref.encode(images, mask)]
    feats = [f.to_dense() for f in other.encode(images, mask)]
    for a, b in zip(feats, feats_ref):
        site = mask.dense_like(b).expand_as(b)
        assert torch.all(a[~site] == 0)
        assert max_errors(a, b)[0] < 1e-10
    x_ref, x = images.clone().requires_grad_(True), images.clone().requires_grad_(True)
    loss_ref, loss = ref(x_ref, mask), other(x, mask)
    loss_ref.backward()
    loss.backward()
    assert abs(loss.item() - loss_ref.item()) < 1e-12
    assert max_errors(x.grad, x_ref.grad)[0] < 1e-10
    grads_ref = dict(ref.named_parameters())
    for name, param in other.named_parameters():
        if grads_ref[name].grad is None:
            assert param.grad is None, name
            continue
        assert max_errors(param.grad, grads_ref[name].grad)[0] < 1e-10, name
    buffers_ref = dict(ref.named_buffers())
    for name, buf in other.named_buffers():
        assert torch.allclose(buf, buffers_ref[name], atol=1e-12), name


@pytest.mark.parametrize("backend", sparse_backend_params())
def test_ten_training_steps_give_the_same_loss_curve(backend):
    curves = {}
    for name in ("masked", backend):
        torch.manual_seed(0)
        spark = ss.create_spark("resnet18", backend=name, input_size=64, drop_path_rate=0.1)
        opt = Lamb(spark.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-6)
        data = torch.Generator().manual_seed(1)
        curve = []
        for step in range(10):
            images = torch.randn(4, 3, 64, 64, generator=data)
            mask = spark.mask(4, generator=torch.Generator().manual_seed(100 + step))
            torch.manual_seed(1000 + step)                     # the same drop-path draws on both backends
            loss = spark(images, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves[name] = curve
    for a, b in zip(curves[backend], curves["masked"]):
        assert abs(a - b) <= 1e-4 * abs(b), (curves[backend], curves["masked"])


@pytest.mark.parametrize("backend", sparse_backend_params())
def test_a_model_trained_on_the_backend_exports_to_timm(backend):
    spark = ss.create_spark("resnet18", backend=backend, input_size=64)
    opt = torch.optim.SGD(spark.parameters(), lr=0.1)
    spark(torch.randn(2, 3, 64, 64)).backward()
    opt.step()
    assert_encoder_matches_timm(spark, "resnet18", spark.encoder_state_dict(), atol=1e-4)
