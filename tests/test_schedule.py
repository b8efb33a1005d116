"""SparK's lr / wd schedule and parameter groups."""
import pytest
import torch

import spark_sparse as ss
from spark_sparse.train.optim import apply_lr_wd, build_optimizer, default_beta2, lr_wd_at, param_groups


@pytest.mark.parametrize("it,expected_lr", [
    (0, 0.005),                      # warm-up starts at 0.005 of the peak
    (5, 0.005 + 0.995 * 0.5),        # halfway through a 10-iteration warm-up
    (10, 1.0),                       # cosine starts at the peak
    (55, 0.001 + 0.999 * 0.5),       # (55 - 10) / (101 - 1 - 10) = 0.5 of the cosine
    (100, 0.001),                    # the last iteration ends at 0.001 of the peak
])
def test_lr_follows_sparks_warmup_then_cosine(it, expected_lr):
    lr, _ = lr_wd_at(it, peak_lr=1.0, wd=0.04, wd_end=0.2, warmup_its=10, total_its=101)
    assert lr == pytest.approx(expected_lr)


@pytest.mark.parametrize("it,expected_wd", [(0, 0.04), (50, 0.12), (100, 0.2)])
def test_weight_decay_follows_a_cosine_from_wd_to_wde(it, expected_wd):
    _, wd = lr_wd_at(it, peak_lr=1.0, wd=0.04, wd_end=0.2, warmup_its=10, total_its=101)
    assert wd == pytest.approx(expected_wd)


def test_no_decay_group_holds_norms_biases_mask_tokens_and_layer_scale():
    spark = ss.create_spark("convnext_tiny", input_size=64)
    groups = {("decay" if g["weight_decay_scale"] else "no_decay"): set(g["names"]) for g in param_groups(spark)}
    assert "mask_tokens.0" in groups["no_decay"]
    assert "encoder.model.stages.0.blocks.0.gamma" in groups["no_decay"]
    assert "encoder.model.stages.0.blocks.0.mlp.fc1.bias" in groups["no_decay"]
    assert "encoder.model.stem.1.weight" in groups["no_decay"]                 # a LayerNorm weight (1-D)
    assert "encoder.model.stages.0.blocks.0.mlp.fc1.weight" in groups["decay"]
    assert "decoder.dec.0.conv.0.weight" in groups["decay"]
    assert "encoder.model.head.norm.weight" not in groups["no_decay"] | groups["decay"]   # frozen head


def test_scheduled_values_reach_each_group_scaled():
    spark = ss.create_spark("tiny_cnn", input_size=64)
    opt = build_optimizer("lamb", param_groups(spark), lr=1.0, beta2=0.95, clip=5.0)
    apply_lr_wd(opt, 0.5, 0.1)
    by_scale = {g["weight_decay_scale"]: g for g in opt.param_groups}
    assert by_scale[1.0]["weight_decay"] == pytest.approx(0.1) and by_scale[0.0]["weight_decay"] == 0
    assert all(g["lr"] == 0.5 for g in opt.param_groups)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-6


def test_beta2_defaults_are_sparks():
    assert default_beta2("bn") == 0.95 and default_beta2("ln") == 0.999


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        build_optimizer("adam", param_groups(torch.nn.Linear(2, 2)), 1.0, 0.9, 0.0)
