"""The ``sparse`` backend's fused BatchNorm+ReLU: the same numbers as BN then ReLU, less kept for backward."""
import copy
import gc
import weakref

import pytest
import torch
import torch.nn as nn
from timm.models.resnet import BasicBlock, Bottleneck

import spark_sparse as ss
from spark_sparse import ActiveMask, SparseRows
from spark_sparse.backends.common import Elementwise, FeatureBatchNorm
from spark_sparse.backends.fused import FusedBatchNormReLU, fuse_bn_relu_pairs
from spark_sparse.backends.rows import SparseConv2d

STRIDE, CHANNELS = 4, 16


def _mask() -> ActiveMask:
    return ActiveMask.random(2, (3, 2), 0.5, generator=torch.Generator().manual_seed(0))


def _rows(mask: ActiveMask, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(mask.num_active(STRIDE), CHANNELS, generator=gen, dtype=dtype) * 2 + 0.3).requires_grad_(True)


def _bn(momentum=0.1) -> FeatureBatchNorm:
    bn = FeatureBatchNorm(CHANNELS, momentum=momentum)
    with torch.no_grad():
        bn.weight.normal_(generator=torch.Generator().manual_seed(2))
        bn.bias.normal_(generator=torch.Generator().manual_seed(3))
    return bn


def _unfused_and_fused(momentum=0.1):
    bn = _bn(momentum)
    fused_bn = copy.deepcopy(bn)
    return (lambda x: Elementwise(nn.ReLU())(bn(x))), bn, FusedBatchNormReLU.from_dense(ss.create_backend("sparse"), fused_bn), fused_bn


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_bn_relu_equals_bn_then_relu_bit_for_bit(momentum):
    mask = _mask()
    unfused, bn, fused, fused_state = _unfused_and_fused(momentum)
    results = []
    for layer, state in ((unfused, bn), (fused, fused_state)):
        x = _rows(mask)
        out = None
        for _ in range(2):                                    # two steps: running statistics accumulate
            out = layer(SparseRows(x, mask, STRIDE))
        grad = torch.randn(out.data.shape, generator=torch.Generator().manual_seed(4))
        (out.data * grad).sum().backward()
        results.append((out.data.detach(), x.grad, state.weight.grad, state.bias.grad, state.running_mean,
                        state.running_var, state.num_batches_tracked))
    for want, got in zip(*results):
        assert torch.equal(got, want)


def test_a_second_backward_through_a_retained_graph_equals_the_unfused_pairs():
    mask = _mask()
    unfused, bn, fused, fused_state = _unfused_and_fused()
    grads = []
    for layer, state in ((unfused, bn), (fused, fused_state)):
        x = _rows(mask)
        out = layer(SparseRows(x, mask, STRIDE)).data.square().sum()
        out.backward(retain_graph=True)
        out.backward()                                        # the fused pair's remade output was taken once
        grads.append((x.grad, state.weight.grad, state.bias.grad))
    for want, got in zip(*grads):
        assert torch.equal(got, want)


def test_fused_bn_relu_outside_training_is_plain_bn_then_relu():
    mask = _mask()
    unfused, bn, fused, _ = _unfused_and_fused()
    bn.eval(), fused.eval()
    x = _rows(mask)
    with torch.no_grad():
        assert torch.equal(fused(SparseRows(x, mask, STRIDE)).data, unfused(SparseRows(x, mask, STRIDE)).data)


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_the_next_conv_keeps_a_recipe_not_the_relu_output(kernel_size):
    """The conv after a fused layer recomputes its input in backward and gets the same gradients."""
    mask = _mask()
    conv = nn.Conv2d(CHANNELS, 8, kernel_size, padding=kernel_size // 2, bias=False)
    sparse_conv = SparseConv2d.from_dense(ss.create_backend("sparse"), conv, "conv")
    results = []
    for fuse in (False, True):
        unfused, bn, fused, fused_state = _unfused_and_fused()
        state = fused_state if fuse else bn
        x = _rows(mask)
        rows = (fused if fuse else unfused)(SparseRows(x, mask, STRIDE))
        calls = []
        if fuse:
            recompute = rows.recompute
            rows.recompute = lambda: calls.append(1) or recompute()
        out = sparse_conv(rows)
        out.data.square().sum().backward()
        results.append((x.grad.clone(), state.weight.grad.clone(), sparse_conv.weight.grad.clone()))
        sparse_conv.weight.grad = None
        assert len(calls) == (1 if fuse else 0)
    for want, got in zip(*results):
        assert torch.equal(got, want)


def _count_fused(module: nn.Module) -> int:
    return sum(isinstance(m, FusedBatchNormReLU) for m in module.modules())


def test_sparse_backend_fuses_the_resnet_pairs_and_keeps_timm_state_names():
    spark = ss.create_spark("resnet50", backend="sparse", input_size=64)
    assert _count_fused(spark.encoder) == 1 + 2 * 16            # the stem, and bn1/bn2 of every bottleneck
    reference = ss.create_spark("resnet50", backend="masked", input_size=64)
    assert spark.encoder.state_dict().keys() == reference.encoder.state_dict().keys()
    assert any("fused" in what for _, what in spark.backend.plan(spark.encoder))
    assert _count_fused(ss.create_spark("resnet50", backend="torch", input_size=64).encoder) == 0


def test_pairs_with_an_active_layer_between_them_stay_unfused():
    block = BasicBlock(CHANNELS, CHANNELS)
    block.bn1, block.act1, block.drop_block = FeatureBatchNorm(CHANNELS), Elementwise(nn.ReLU()), nn.Dropout()
    fuse_bn_relu_pairs(ss.create_backend("sparse"), block, ((("bn1", "act1", ("drop_block",))),))
    assert type(block.bn1) is FeatureBatchNorm
    block = Bottleneck(CHANNELS, CHANNELS // 4)
    block.bn1, block.act1 = FeatureBatchNorm(CHANNELS // 4), Elementwise(nn.GELU())
    fuse_bn_relu_pairs(ss.create_backend("sparse"), block, ((("bn1", "act1", ())),))
    assert type(block.bn1) is FeatureBatchNorm               # not a ReLU: left alone


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_nothing_keeps_the_relu_output_once_the_next_conv_has_run(kernel_size):
    mask = _mask()
    conv = SparseConv2d.from_dense(ss.create_backend("sparse"), nn.Conv2d(CHANNELS, 8, kernel_size, padding=kernel_size // 2,
                                                                          bias=False), "conv")
    _, _, fused, _ = _unfused_and_fused()
    rows = fused(SparseRows(_rows(mask), mask, STRIDE))
    relu_output = weakref.ref(rows.data)
    out = conv(rows)
    del rows
    gc.collect()
    assert relu_output() is None
    out.data.sum().backward()                                 # and backward still has what it needs


def test_synchronised_batch_norm_is_never_fused():
    """SyncBN (SparK's --sbn) keeps its own layer and its ReLU: no statistics are synchronised here."""
    spark = ss.create_spark("resnet18", backend="sparse", input_size=64, sync_bn=True)
    assert _count_fused(spark.encoder) == 0
    assert isinstance(spark.encoder.model.layer1[0].act1, Elementwise)
