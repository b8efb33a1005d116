"""timm CNN families as SparK encoders: defaults, strict export to timm, the generic path, clear refusals.

fp64 equivalence of features, loss and every gradient on every backend is in
tests/test_equivalence_encoders.py; the layers' semantics in tests/test_models_semantics.py.
"""
import pytest
import timm
import torch
from timm.layers import DropPath
from click.testing import CliRunner

import spark_sparse as ss
from spark_sparse import ActiveMask
from spark_sparse.models.timm_encoders import UnsuitableModelError
from spark_sparse.testing import switch_branches_on

from apptools import make_image_folder
from equivalence import draw_learnable_affines, sparse_backend_params

#: SparK-style defaults per family member: (drop path, densify norm)
DEFAULTS = {"resnet50d": (0.05, "bn"), "seresnet50": (0.05, "bn"), "resnext50_32x4d": (0.05, "bn"),
            "resnetblur50": (0.05, "bn"),
            "regnety_016": (0.0, "bn"), "efficientnet_b0": (0.0, "bn"), "mobilenetv3_large_100": (0.0, "bn"),
            "convnextv2_tiny": (0.1, "ln"), "resnetv2_50x1_bit": (0.05, "bn"),
            # channel split / concatenation (CSPNet, DenseNet, VoVNet, Res2Net) and ByobNet's blocks
            "cspresnet50": (0.05, "bn"), "cspdarknet53": (0.05, "bn"), "gernet_m": (0.0, "bn"),
            "repvgg_a2": (0.0, "bn"), "regnetz_c16": (0.0, "bn"), "resnet33ts": (0.05, "bn"),
            "densenet121": (0.0, "bn"), "ese_vovnet39b": (0.0, "bn"), "res2net50_26w_4s": (0.0, "bn"),
            "ghostnet_100": (0.0, "bn"), "mobilenetv4_conv_small": (0.0, "bn"),
            # MixedConv2d, TensorFlow-"SAME" padding, lists of maps, nearest upsampling, scalar gains, ...
            "mixnet_s": (0.0, "bn"), "tf_efficientnet_b0": (0.0, "bn"), "tf_efficientnetv2_s": (0.05, "bn"),
            "rexnet_100": (0.0, "bn"), "selecsls42b": (0.0, "bn"), "dla34": (0.0, "bn"),
            "hrnet_w18_small": (0.0, "bn"), "nf_resnet50": (0.05, "bn"), "eca_nfnet_l0": (0.05, "bn"),
            "xception41": (0.05, "bn"), "dpn68": (0.0, "bn"), "repghostnet_100": (0.0, "bn"),
            "vgg11_bn": (0.0, "bn"), "hgnet_tiny": (0.0, "bn"), "inception_next_tiny": (0.1, "bn"),
            "legacy_seresnet18": (0.0, "bn"), "resnest14d": (0.0, "bn"), "resnest50d": (0.05, "bn"),
            "skresnet18": (0.0, "bn"), "skresnext50_32x4d": (0.05, "bn"), "hgnetv2_b0": (0.0, "bn"),
            # detection and mobile backbones: CSPNeXt (RTMDet), FasterNet, RDNet, RepViT, LCNet-V2
            "cspnext_tiny": (0.0, "bn"), "fasternet_t0": (0.0, "bn"), "rdnet_tiny": (0.1, "ln"),
            "repvit_m0_9": (0.0, "bn"), "lcnetv2_small": (0.0, "bn"), "starnet_s1": (0.0, "bn"),
            "gcresnet33ts": (0.05, "bn"), "convformer_s18": (0.1, "ln"),
            "poolformerv2_s12": (0.1, "ln"), "fastvit_t8": (0.0, "bn"),
            "mambaout_tiny": (0.1, "ln"), "focalnet_tiny_srf": (0.1, "ln"),
            "efficientvit_b0": (0.0, "bn"), "edgenext_small": (0.1, "ln"),
            "swiftformer_xs": (0.0, "bn"), "tresnet_m": (0.05, "bn"),
            # softmax self-attention among each image's active tokens: CAFormer, FastViT's sa variants
            "caformer_s18": (0.1, "ln"), "fastvit_sa12": (0.0, "bn"), "mobilenetv4_hybrid_medium": (0.0, "bn"),
            "mobilevit_xs": (0.0, "bn"), "mobilevitv2_050": (0.0, "bn"), "efficientnet_cc_b0_4e": (0.0, "bn"),
            # window attention (7x7 windows) and channel attention among each image's active tokens
            "davit_tiny": (0.1, "ln"),
            # attention with relative-position biases among each image's active tokens (7x7 grid: 224 px only)
            "efficientformer_l1": (0.0, "bn"),
            # spatial-reduction attention: each active token over the keys of its image's active patches
            "pvt_v2_b0": (0.1, "ln"),
            # the same attention (Twins-PCPVT), and alternating with 7x7 window attention (Twins-SVT)
            "twins_pcpvt_small": (0.1, "ln"), "twins_svt_small": (0.1, "ln"),
            # 7x7 window attention with relative position biases, every other block in shifted windows; Swin-V2's
            # 8x8 cosine window attention with continuous position biases
            "swin_tiny_patch4_window7_224": (0.1, "ln"), "swinv2_tiny_window8_256": (0.1, "ln")}
FAMILY_MODELS = list(DEFAULTS)
#: nets whose blocks need maps of their own sizes: DaViT's, Twins-SVT's and Swin's 7x7 windows tile multiples of 224
#: only (smaller inputs are refused: timm would pad with tokens that attend; timm's Swin takes its img_size alone,
#: Swin-V2's 256 for 8x8 windows), EfficientFormer's attention biases exist for 224 px alone
INPUT_SIZE = {"davit_tiny": 224, "efficientformer_l1": 224, "twins_svt_small": 224, "swin_tiny_patch4_window7_224": 224,
              "swinv2_tiny_window8_256": 256}
#: timm nets that compute part of their forward in fp32 whatever the model's dtype: EfficientViT's LiteMLA
#: casts q, k, v with ``.float()`` (ours keeps at least their dtype), so in fp64 timm's own features carry
#: fp32 rounding of its attention (8e-8 relative here); compared at fp32's precision instead of 1e-9
FP32_INSIDE_TIMM = {"efficientvit_b0": 1e-6}


def assert_exports_to_timm(spark: ss.SparK, name: str) -> None:
    """``timm.create_model(name, num_classes=0)`` loads the export strictly and, with every patch visible,
    computes the SparK encoder's hierarchical features (timm's ``forward_intermediates``; in fp64, so
    that a 50-layer net's fp32 rounding does not blur the comparison). Parameters timm starts at zero or
    1e-6 to switch residual branches off are drawn first (in ``spark``), so the branches count."""
    switch_branches_on(spark.encoder, low=0.1, high=0.2)     # eval mode: keep activations bounded
    dense = timm.create_model(name, pretrained=False, num_classes=0)
    dense.load_state_dict(spark.encoder_state_dict(), strict=True)
    spark.eval().double(), dense.eval().double()
    size = INPUT_SIZE.get(name, 64)
    images = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        ours = [f.to_dense() for f in spark.encode(images, ActiveMask.full(2, (size // 32, size // 32)))]
        theirs = dense.forward_intermediates(images, indices=spark.encoder.feature_indices, norm=True,
                                             intermediates_only=True)
    assert [tuple(f.shape[1:]) for f in ours] == [tuple(f.shape[1:]) for f in theirs]
    for a, b in zip(ours, theirs):
        tolerance = FP32_INSIDE_TIMM.get(name, 1e-9)
        torch.testing.assert_close(a, b, atol=tolerance * max(1.0, float(b.abs().max())), rtol=tolerance)


def test_every_family_model_is_listed_as_tested_and_the_old_signature_works():
    assert set(FAMILY_MODELS) <= set(ss.list_models(tested_only=True))
    assert set(ss.list_models(tested_only=True)) <= set(ss.list_models()) == set(ss.list_models(tested_only=False))
    assert "tiny_cnn" in ss.list_models() and "tiny_cnn" not in ss.list_models(tested_only=True)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_model_has_sparks_defaults_trains_on_the_sparse_backend_and_exports_strictly_to_timm(name):
    torch.manual_seed(0)
    size = INPUT_SIZE.get(name, 64)
    spark = ss.create_spark(name, backend="sparse", input_size=size)
    drop_path, densify_norm = DEFAULTS[name]
    assert ss.models.model_default_drop_path(name) == drop_path
    assert spark.densify_norm_kind == densify_norm
    images = torch.randn(2, 3, size, size)
    features = spark.encode(images, spark.mask(2))
    assert [f.stride for f in features] == [4, 8, 16, 32]
    assert [f.channels for f in features] == spark.encoder.get_feature_map_channels()
    opt = torch.optim.SGD(spark.parameters(), lr=0.01)
    spark(images).backward()
    opt.step()
    assert_exports_to_timm(spark, name)


def test_hgnetv2_stem_without_its_pads_computes_timms_and_a_stem_it_does_not_reproduce_is_refused(monkeypatch):
    """HGNet-V2's ``F.pad`` calls are folded into SAME convs and a zero-padded pool: with random learnable
    affines (negative values, so the padding's zeros win pool windows) the encoder still equals timm's
    model on an all-visible mask; a timm stem computing anything else is refused, never replaced."""
    from timm.models.hgnet import StemV2

    torch.manual_seed(0)
    spark = ss.create_spark("hgnetv2_b0", backend="sparse", input_size=64)
    draw_learnable_affines(spark)
    assert_exports_to_timm(spark, "hgnetv2_b0")

    timm_forward = StemV2.forward
    monkeypatch.setattr(StemV2, "forward", lambda self, x: timm_forward(self, x.flip(-1)))
    with pytest.raises(UnsuitableModelError, match="HGNet-V2 stem .* no longer computes"):
        ss.create_spark("hgnetv2_b0", backend="sparse", input_size=64)


def test_heads_are_left_out_of_the_hierarchy_and_frozen():
    spark = ss.create_spark("efficientnet_b0", backend="sparse", input_size=64)
    assert spark.encoder.modules_outside_hierarchy() == ["model.conv_head", "model.bn2", "model.global_pool",
                                                         "model.classifier"]
    assert not any(p.requires_grad for p in spark.encoder.model.conv_head.parameters())


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "mobileone_s0"])
def test_any_timm_cnn_with_supported_layers_works_by_its_timm_name(name):
    """Registered nowhere, served by the timm fallback: MobileOne runs on ByobNet's registered blocks."""
    assert name not in ss.list_models()
    assert ss.models.model_default_drop_path(name) == 0.0
    torch.manual_seed(0)
    spark = ss.create_spark(name, backend="sparse", input_size=64)
    spark(torch.randn(2, 3, 64, 64)).backward()
    assert_exports_to_timm(spark, name)


def test_an_rms_norm_convnext_runs_by_its_timm_name_with_sparks_layernorm_densify_norm():
    """RMS norms are per-site channel norms: an RMS-norm net without BatchNorm densifies with LayerNorm,
    as SparK's ConvNeXt (a timm name registered nowhere, so the choice is the generic guess)."""
    torch.manual_seed(0)
    spark = ss.create_spark("convnext_zepto_rms", backend="sparse", input_size=64)
    assert spark.densify_norm_kind == "ln"
    spark(torch.randn(2, 3, 64, 64)).backward()
    assert_exports_to_timm(spark, "convnext_zepto_rms")


@pytest.mark.parametrize("name,error,match", [
    ("lambda_resnet26t", ss.UnsupportedModuleError, r"'model\.stages\.2\.1' of type .*SelfAttnBlock"),
    ("nextvit_small", ss.UnsupportedModuleError, r"'model' of type .*NextViT"),
    ("ghostnetv2_100", ss.UnsupportedModuleError, r"'model\.blocks\.2\.0\.ghost1' of type .*GhostModuleV2"),
    ("pvt_v2_b2_li", ss.UnsupportedModuleError, r"'model\.stages\.0\.blocks\.0\.attn'.*linear attention"),
    ("efficientformerv2_s0", UnsuitableModelError, r"fails on a 64px image \(RuntimeError: shape '\[1, 8, -1, 49\]'"),
    ("vit_tiny_patch16_224", UnsuitableModelError, r"no feature map at stride\(s\) \[4, 8, 32\]"),
    # SwinV2-CR (scaled cosine attention with a meta network for its position biases): another class than Swin-V2's
    ("swinv2_cr_tiny_ns_224", ss.UnsupportedModuleError, r"'model' of type .*SwinTransformerV2Cr:"),
    # timm's own forward refuses other sizes: a bare assert (BoTNet), a shape error (LambdaNet)
    ("botnet26t_256", UnsuitableModelError, r"'botnet26t_256' .* fails on a 64px image \(AssertionError: no message\)"),
    ("lambda_resnet26rpt_256", UnsuitableModelError, r"fails on a 64px image \(RuntimeError: Expected size"),
])
def test_an_unsupported_timm_model_fails_at_creation_naming_the_module(name, error, match):
    with pytest.raises(error, match=match):
        ss.create_spark(name, backend="sparse", input_size=64)


def test_the_drop_path_asked_for_is_the_one_that_runs_even_where_timm_defaults_to_another():
    """FasterNet-T2's timm entrypoint defaults to drop path 0.05: SparK's default for an unregistered name
    is 0 and must be what runs (it is what the log says), and a given rate replaces timm's."""
    def rates(spark):
        return {round(m.drop_prob, 6) for m in spark.modules() if isinstance(m, DropPath) and m.drop_prob}

    assert ss.models.model_default_drop_path("fasternet_t2") == 0.0
    assert rates(ss.create_spark("fasternet_t2", backend="sparse", input_size=64)) == set()
    assert max(rates(ss.create_spark("fasternet_t2", backend="sparse", input_size=64, drop_path_rate=0.2))) == 0.2


def test_a_drop_path_for_a_net_without_one_is_refused_at_creation():
    with pytest.raises(UnsuitableModelError, match=r"'densenet121' has no drop path .* --dp 0"):
        ss.create_spark("densenet121", backend="sparse", input_size=64, drop_path_rate=0.1)


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_dropout_inside_densenet_layers_is_refused_on_the_first_training_forward(backend):
    spark = ss.create_spark("densenet121", backend=backend, input_size=64, proj_drop_rate=0.2)
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"F\.dropout is not defined on SparK feature maps"):
        spark(torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("backend", ["sparse", "torch", "auto"])
def test_dropout_modules_are_refused_on_row_backends_and_run_on_masked(backend):
    """Dropout draws one random value per element: over the dense map on masked, over the active rows on the others,
    so the same seed would drop other values. Refused at creation; masked (SparK's own computation) runs it; a
    classifier's dropout, outside the hierarchy, is no concern."""
    with pytest.raises(ss.UnsupportedModuleError, match=r"cannot run 'model.stages.0.blocks.0.mlp.drop1' \(Dropout, "
                                                        r"p=0.1\): dropout draws its random values over the dense map"):
        ss.create_spark("convformer_s18", backend=backend, input_size=64, proj_drop_rate=0.1)
    ss.create_spark("convformer_s18", backend="masked", input_size=64, proj_drop_rate=0.1)
    ss.create_spark("convnext_tiny", backend=backend, input_size=64, drop_rate=0.5)


def test_an_unknown_name_mentions_timm_names():
    with pytest.raises(ss.UnknownModelError, match="any timm CNN"):
        ss.create_spark("no_such_net")


def test_each_family_module_registers_the_models_its_table_lists():
    """``spark_sparse.models.FAMILIES`` names each family's models for the error of a family this timm cannot
    load: the lists must be what the modules register (with the timm the tests run on, every family loads)."""
    from spark_sparse.models import FAMILIES, unavailable_families
    from spark_sparse.models.registry import _MODELS

    assert unavailable_families() == {}
    listed = [name for _, models in FAMILIES for name in models.split()]
    ours = [name for name, factory in _MODELS.items() if factory.__module__.startswith("spark_sparse.")]
    assert sorted(listed) == sorted(ours)                      # each of this package's models listed once


_WITHOUT_CSPNEXT = """
import sys
import timm
import timm.layers
import timm.layers.fast_norm
sys.modules["timm.models.cspnext"] = None          # as in a timm release before CSPNeXt: importing it fails
for name in ("RmsNorm2d", "SimpleNorm", "SimpleNorm2d"):   # and before these norms (their converters left out)
    delattr(timm.layers, name)
del timm.layers.fast_norm.simple_norm
import spark_sparse as ss
from spark_sparse.models import unavailable_families
models, reason = unavailable_families()["cspnext"]
print("LEFT OUT", sorted(unavailable_families()), models, reason)
assert {"resnet50", "cspresnet50"} <= set(ss.list_models()) and "cspnext_tiny" not in ss.list_models()
for name in ("cspnext_tiny", "no_such_net"):
    try:
        ss.create_spark(name)
    except ss.UnknownModelError as error:
        print("ERROR", name, error)
ss.create_spark("resnet18", input_size=64)
print("RESNET OK")
"""


def test_a_family_or_a_layer_this_timm_lacks_is_left_out_and_named_while_the_others_work():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _WITHOUT_CSPNEXT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "LEFT OUT ['cspnext'] ('cspnext_tiny',) import of timm.models.cspnext" in out, out
    assert (f"ERROR cspnext_tiny model 'cspnext_tiny' needs a newer timm than this one ({timm.__version__}): its "
            f"family (cspnext) could not be loaded (import of timm.models.cspnext halted; None in sys.modules); "
            f"upgrade timm (pip install -U timm)") in out, out
    assert f"with this timm ({timm.__version__}) these families are left out, a newer one has them: cspnext" in out, out
    assert "RESNET OK" in out, out


#: the command line on one model of each kind of parameter the trainer treats apart: LayerNorm densify
#: norms and GRN (convnextv2), weight gains and scalar gains without norm layers (nf_resnet50), a head
#: left out of the hierarchy and frozen (efficientnet_b0), concatenation (densenet121), parallel
#: branches (hrnet_w18_small). Every family model's training step and strict export is checked above
#: without the command line (the same ``SparK`` and ``encoder_state_dict`` the trainer uses), so running
#: each again through it would only repeat that at several seconds a model.
CLI_MODELS = ("convnextv2_tiny", "nf_resnet50", "efficientnet_b0", "densenet121", "hrnet_w18_small")


def _cli_runs() -> list:
    """Representative family models on ``sparse``, and one model with SE, hard-swish and depthwise convs
    on every other backend (each skipped with its reason where unavailable); the fp64 equivalence of every
    model on every backend is in tests/test_equivalence_encoders.py."""
    runs = [pytest.param(name, "sparse", id=f"{name}-sparse") for name in CLI_MODELS]
    runs += [pytest.param("mobilenetv3_large_100", "masked", id="mobilenetv3_large_100-masked")]
    runs += [pytest.param("mobilenetv3_large_100", param.values[0], marks=param.marks,
                          id=f"mobilenetv3_large_100-{param.values[0]}")
             for param in sparse_backend_params() if param.values[0] != "sparse"]
    return runs


@pytest.mark.parametrize("name,backend", _cli_runs())
def test_spark_pretrain_runs_a_family_model(name, backend, tmp_path):
    from spark_sparse import cli

    data = make_image_folder(tmp_path / "data", count=4)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.pretrain_command, [
        "t", f"--data_path={data}", f"--exp_dir={out}", f"--model={name}", f"--backend={backend}", "--input_size=64",
        "--bs=2", "--ep=1", "--wp_ep=1", "--dataloader_workers=0", "--device=cpu", "--autotune=off"],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    timm.create_model(name, pretrained=False, num_classes=0).load_state_dict(
        torch.load(out / f"{name}_1kpretrained.pth"), strict=True)


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_synchronised_batch_norm_keeps_the_activation_of_timms_norm_act_layers(backend):
    """SparK's --sbn converts every BatchNorm to SyncBatchNorm: BatchNormAct2d must keep its activation."""
    torch.manual_seed(0)
    plain = ss.create_spark("mobilenetv3_large_100", backend=backend, input_size=64)
    synced = ss.create_spark("mobilenetv3_large_100", backend=backend, input_size=64, sync_bn=True)
    synced.load_state_dict(plain.state_dict())
    plain.eval(), synced.eval()                    # running statistics: no process group needed
    images = torch.randn(2, 3, 64, 64)
    mask = plain.mask(2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for a, b in zip(plain.encode(images, mask), synced.encode(images, mask)):
            torch.testing.assert_close(b.to_dense(), a.to_dense())
