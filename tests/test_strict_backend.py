"""The kernel plan and ``strict_backend``: fallbacks are visible, and an error when forbidden."""
import pytest
import torch

import spark_sparse as ss
from spark_sparse.kernels import NoKernelError, list_kernels

needs_spconv = pytest.mark.skipif(not list_kernels()["spconv"].availability()[0],
                                  reason=list_kernels()["spconv"].availability()[1])


@needs_spconv
def test_depthwise_falls_back_to_our_kernel_and_the_plan_says_why():
    spark = ss.create_spark("convnext_tiny", backend="spconv", input_size=64)
    plan = dict(spark.backend.plan(spark.encoder))
    assert plan["model.stages.0.blocks.0.conv_dw"].startswith("gemm")
    assert "groups=1 only" in plan["model.stages.0.blocks.0.conv_dw"]
    assert plan["model.stem.0"].startswith("spconv")


@needs_spconv
def test_strict_backend_names_the_layer_and_every_reason():
    spark = ss.create_spark("convnext_tiny", backend="spconv", input_size=64, strict_backend=True)
    with pytest.raises(NoKernelError, match=r"model\.stages\.0\.blocks\.0\.conv_dw.*groups=96.*--strict-backend"):
        spark(torch.randn(1, 3, 64, 64))


@needs_spconv
def test_bf16_is_refused_by_spconv_in_words():
    spark = ss.create_spark("resnet18", backend="spconv", input_size=64)
    plan = dict(spark.backend.plan(spark.encoder, "cpu", torch.bfloat16))
    assert "dtype bfloat16 not supported" in plan["model.conv1"]


def test_strict_backend_passes_when_every_layer_runs_on_the_first_kernel():
    spark = ss.create_spark("convnext_tiny", backend="torch", input_size=64, strict_backend=True)
    assert all(how.startswith("gather") for _, how in spark.backend.plan(spark.encoder))
