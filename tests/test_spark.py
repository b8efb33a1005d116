"""The SparK module: densify, decoder, loss, reconstruction and the public API's errors."""
import re
import types

import pytest
import torch
import torch.nn as nn

import spark_sparse as ss
from spark_sparse import ActiveMask
from spark_sparse.decoder import LightDecoder
from spark_sparse.errors import ConfigError


def test_loss_matches_a_hand_computed_tiny_case():
    spark = ss.create_spark("tiny_cnn", input_size=64)
    images = torch.arange(2 * 3 * 64 * 64, dtype=torch.float32).reshape(2, 3, 64, 64).sin()
    prediction = torch.linspace(-1, 1, 2 * 3 * 64 * 64).reshape(2, 3, 64, 64)
    mask = ActiveMask(torch.tensor([[[[True, False], [False, False]]], [[[False, True], [True, True]]]]))

    total, count = 0.0, 0
    for b in range(2):
        for py in range(2):
            for px in range(2):
                if mask.active[b, 0, py, px]:
                    continue
                target = images[b, :, py * 32:(py + 1) * 32, px * 32:(px + 1) * 32]
                pred = prediction[b, :, py * 32:(py + 1) * 32, px * 32:(px + 1) * 32]
                # SparK orders each patch's pixels (y, x, c); the normalisation is order-free anyway
                t = target.permute(1, 2, 0).reshape(-1).double()
                p = pred.permute(1, 2, 0).reshape(-1).double()
                t = (t - t.mean()) / torch.sqrt(t.var(unbiased=True) + 1e-6)
                total += float(((p - t) ** 2).mean())
                count += 1
    expected = total / count
    got = spark.loss(images, prediction, mask)
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("hw", [(64, 64), (96, 64)])
def test_decoder_restores_the_input_resolution(hw):
    spark = ss.create_spark("resnet18", input_size=hw)
    images = torch.randn(2, 3, *hw)
    mask = spark.mask(2, image_hw=hw)
    assert spark.predict(images, mask).shape == (2, 3, *hw)


def test_light_decoder_widths_halve_and_end_in_rgb():
    dec = LightDecoder(32, width=768)
    assert [blk.up_sample.in_channels for blk in dec.dec] == [768, 384, 192, 96, 48]
    assert dec.proj.out_channels == 3 and dec.proj.in_channels == 24


def test_densify_projection_is_identity_when_widths_match():
    spark = ss.create_spark("resnet18", input_size=64, decoder_width=512)
    assert isinstance(spark.densify_projs[0], nn.Identity)
    assert [p.kernel_size for p in spark.densify_projs[1:]] == [(3, 3)] * 3
    spark = ss.create_spark("resnet18", input_size=64)
    assert spark.densify_projs[0].kernel_size == (1, 1)


def test_mask_tokens_are_truncated_normal_within_two_hundredths():
    spark = ss.create_spark("resnet50", input_size=64)
    for token in spark.mask_tokens:
        assert token.abs().max() <= 0.02 and token.std() > 0.005


@pytest.mark.parametrize("model,frozen", [("resnet18", set()), ("convnext_tiny", {"encoder.model.head.norm.weight", "encoder.model.head.norm.bias"})])
def test_gradients_reach_every_trainable_parameter(model, frozen):
    spark = ss.create_spark(model, input_size=64, drop_path_rate=0.0)
    spark(torch.randn(2, 3, 64, 64)).backward()
    # (timm zero-initialises each residual branch's last BN, so some gradients are 0 at init: what
    # matters is that autograd reaches them)
    assert {n for n, p in spark.named_parameters() if not p.requires_grad} == frozen
    no_grad = {n for n, p in spark.named_parameters() if p.grad is None}
    assert no_grad == frozen
    assert all(p.grad.abs().sum() > 0 for n, p in spark.named_parameters() if n.startswith(("decoder", "densify", "mask_tokens")))


def test_densify_norm_follows_the_model_family():
    assert ss.create_spark("resnet18", input_size=64).densify_norm_kind == "bn"
    assert ss.create_spark("convnext_tiny", input_size=64).densify_norm_kind == "ln"


def test_a_users_encoder_gets_sparks_densify_norm_rule_unless_it_names_its_own():
    from timm.layers import LayerNorm2d

    class Stages(nn.Module):
        """Four stride-2 stages (strides 4-32 after a stride-2 stem) with ``norm`` after each conv."""

        def __init__(self, norm):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, 2, 1)
            self.stages = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, 2, 1), norm(c)) for c in (8, 8, 8, 8))

        def get_downsample_ratio(self):
            return 32

        def get_feature_map_channels(self):
            return [8, 8, 8, 8]

        def forward(self, x, hierarchical=True):
            x, features = self.stem(x), []
            for stage in self.stages:
                x = stage(x)
                features.append(x)
            return features

    assert ss.SparK(Stages(LayerNorm2d), "masked", input_size=64).densify_norm_kind == "ln"
    assert ss.SparK(Stages(nn.BatchNorm2d), "masked", input_size=64).densify_norm_kind == "bn"
    named = Stages(LayerNorm2d)
    named.densify_norm = "bn"
    assert ss.SparK(named, "masked", input_size=64).densify_norm_kind == "bn"


def test_custom_model_pretrains_for_a_step():
    spark = ss.create_spark("tiny_cnn", input_size=64)
    opt = torch.optim.AdamW(spark.parameters(), lr=1e-3)
    images = torch.randn(4, 3, 64, 64)
    mask = spark.mask(4, generator=torch.Generator().manual_seed(0))
    before = spark(images, mask)
    before.backward()
    opt.step()
    after = spark(images, mask)
    assert torch.isfinite(after) and after.item() != before.item()


def test_reconstruction_keeps_visible_patches_and_fills_masked_ones():
    spark = ss.create_spark("tiny_cnn", input_size=64).eval()
    images = torch.randn(2, 3, 64, 64)
    mask = spark.mask(2, generator=torch.Generator().manual_seed(0))
    inp, masked, rec = spark.reconstruct(images, mask)
    pixels = mask.dense_at(1).expand_as(images)
    assert torch.equal(inp, images)
    assert torch.equal(masked[pixels], images[pixels]) and torch.all(masked[~pixels] == 0)
    assert torch.equal(rec[pixels], images[pixels]) and not torch.equal(rec[~pixels], images[~pixels])


def test_reconstruction_grid_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from spark_sparse.train.visualize import save_reconstruction_grid

    spark = ss.create_spark("tiny_cnn", input_size=64)
    images = torch.randn(1, 3, 64, 64)
    mask = spark.mask(1, generator=torch.Generator().manual_seed(0))
    path = save_reconstruction_grid(spark, images, mask, tmp_path / "reconstruction.png")
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")

    def disk_full(self, fname, **kwargs):
        open(fname, "wb").write(b"half a png")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_reconstruction_grid(spark, images, mask, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reconstruction.png"]
    assert path.read_bytes() == before


# ---------------------------------------------------------------------- bad input
def test_unknown_model_lists_known_ones():
    with pytest.raises(ss.UnknownModelError, match="resnet50.*convnext_tiny|convnext_tiny.*resnet50"):
        ss.create_spark("resnet9000")


def test_spark_aliases_resolve():
    assert ss.create_spark("res50", input_size=64).encoder.timm_name == "resnet50"


def test_unknown_backend_lists_registered_ones():
    with pytest.raises(ss.UnknownBackendError, match="masked"):
        ss.create_spark("resnet18", backend="cudnn-magic", input_size=64)


@pytest.mark.parametrize("size", [100, (64, 80), 0])
def test_input_size_must_be_a_multiple_of_32(size):
    with pytest.raises(ValueError, match="each side must be a positive multiple of the downsample ratio 32"):
        ss.create_spark("tiny_cnn", input_size=size)


def test_images_of_a_wrong_size_are_refused():
    spark = ss.create_spark("tiny_cnn", input_size=64)
    with pytest.raises(ValueError, match="positive multiple of the downsample ratio"):
        spark(torch.randn(1, 3, 70, 64))


@pytest.mark.parametrize("images, error, refusal", [
    ([torch.randn(3, 64, 64)], TypeError, "images must be one tensor (B, 3, H, W), got list (a list of images: "
                                          "torch.stack them)"),
    (torch.randn(3, 64, 64), ValueError, "images must be (B, C, H, W), got shape (3, 64, 64)"),
    (torch.randn(0, 3, 64, 64), ValueError, "with B at least 1"),
    (torch.randn(2, 1, 64, 64), ValueError, "(SparK reconstructs RGB images), got shape (2, 1, 64, 64)"),
    (torch.randn(2, 3, 64, 64, dtype=torch.float64), TypeError,
     "images are torch.float64, the model's weights torch.float32: convert them with images.to(torch.float32)"),
    (torch.zeros(2, 3, 64, 64, dtype=torch.uint8), TypeError, "images are torch.uint8, the model's weights "
                                                              "torch.float32: scale them to floats"),
])
@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_images_no_forward_can_use_are_refused_with_the_fix(backend, images, error, refusal):
    spark = ss.create_spark("tiny_cnn", backend=backend, input_size=64)
    with pytest.raises(error, match=re.escape(refusal)):
        spark(images)
    with pytest.raises(error, match=re.escape(refusal)):
        spark.reconstruct(images)


def test_images_of_the_models_own_dtype_run():
    spark = ss.create_spark("tiny_cnn", backend="sparse", input_size=64).double()
    assert spark(torch.randn(2, 3, 64, 64, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_a_mask_for_no_images_or_a_non_integer_batch_is_refused(batch_size):
    spark = ss.create_spark("tiny_cnn", input_size=64)
    with pytest.raises(ValueError, match=re.escape(f"a batch of at least 1 image, got batch_size={batch_size!r}")):
        spark.mask(batch_size)


def test_constructor_arguments_given_as_a_model_kwargs_dict_are_refused_with_the_spelling_that_works(monkeypatch):
    monkeypatch.setattr("spark_sparse.spark.create_encoder", lambda *a, **k: pytest.fail("built the model"))
    with pytest.raises(ConfigError, match=re.escape("keywords of its own (create_spark(name, channels=(8, 16))), not "
                                                    "as model_kwargs={...}")):
        ss.create_spark("resnet18", input_size=64, model_kwargs={"channels": (8, 16)})


def test_wrong_shaped_mask_is_refused():
    spark = ss.create_spark("tiny_cnn", input_size=64)
    with pytest.raises(ValueError, match="active mask has shape"):
        spark(torch.randn(2, 3, 64, 64), ActiveMask.random(2, (3, 3), 0.5))
    with pytest.raises(ValueError, match=r"\(B, 1, h, w\)"):
        spark(torch.randn(2, 3, 64, 64), torch.ones(2, 2, 2, 2, 2, dtype=torch.bool))


def test_mask_ratio_that_leaves_nothing_visible_is_refused():
    with pytest.raises(ValueError, match="keeps round"):
        ss.create_spark("tiny_cnn", input_size=64, mask_ratio=0.9)


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_an_operation_a_feature_map_refuses_names_the_block_that_asked_for_it(backend):
    """A block's forward doing what a feature map cannot (here a transpose of H and W) fails naming that block,
    found in the traceback (the map's own message cannot know which module called it)."""
    spark = ss.create_spark("resnet18", backend=backend, input_size=64)
    block = spark.encoder.model.layer2[0]

    def transposing_forward(self, x):
        return x.permute(0, 1, 3, 2)

    block.forward = types.MethodType(transposing_forward, block)
    with pytest.raises(ss.UnsupportedFeatureOperation,
                       match=r"^in module 'model\.layer2\.0' \(timm\.models\.resnet\.BasicBlock\): .*permute"):
        spark(torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_maps_of_other_sites_combined_in_a_block_name_that_block(backend):
    spark = ss.create_spark("resnet18", backend=backend, input_size=64)
    block = spark.encoder.model.layer2[0]

    def adding_across_strides(self, x):
        return x + self.downsample(x)           # stride 4 plus stride 8: the dense model fails on shapes too

    block.forward = types.MethodType(adding_across_strides, block)
    with pytest.raises(ss.FeatureMapMismatch, match=r"^in module 'model\.layer2\.0' .*: cannot add feature maps of "
                                                    r"different kinds, masks or strides .* stride 4, .* stride 8"):
        spark(torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_an_operation_refused_in_the_encoders_own_forward_says_so(backend):
    """The encoder itself has no name among its modules: the error says it was its own forward."""
    spark = ss.create_spark("tiny_cnn", backend=backend, input_size=64)
    encoder_forward = spark.encoder.forward

    def shifted_forward(self, x, hierarchical=True):
        return [fmap + 0.1 for fmap in encoder_forward(x, hierarchical=hierarchical)]

    spark.encoder.forward = types.MethodType(shifted_forward, spark.encoder)
    with pytest.raises(ss.UnsupportedFeatureOperation, match=r"^in the encoder's own forward \(.*\): cannot add the "
                                                             r"number 0\.1 to a SparK feature map"):
        spark(torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("kwargs, refusal", [
    ({"num_classes": 10}, "num_classes: the encoder is built without a classifier"),
    ({"pretrained": True}, "pretrained: weights are never downloaded: start from a file (--init_weight"),
    ({"in_chans": 1}, "in_chans=1: SparK reconstructs the 3 channels of RGB images"),
])
def test_model_arguments_no_spark_encoder_can_use_are_refused_before_building(kwargs, refusal, monkeypatch):
    monkeypatch.setattr("spark_sparse.spark.create_encoder", lambda *a, **k: pytest.fail("built the model"))
    with pytest.raises(ConfigError, match=re.escape(refusal)):
        ss.create_spark("resnet18", input_size=64, **kwargs)


def test_model_arguments_reach_the_encoders_constructor():
    spark = ss.create_spark("resnet18", backend="sparse", input_size=64, in_chans=3, channels=(8, 16, 32, 64))
    assert spark.encoder.get_feature_map_channels() == [8, 16, 32, 64]


def test_a_constructor_argument_called_name_reaches_the_constructor():
    with pytest.raises(ConfigError, match=r"model 'tiny_cnn' could not be built with name='x' \(TypeError"):
        ss.create_spark("tiny_cnn", input_size=64, name="x")


class _WrappedConv(torch.nn.Module):
    """A user's wrapper around a conv, to be converted by a converter that drops the wrapper."""

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


def test_a_converter_that_renames_the_weights_is_refused_at_creation(monkeypatch):
    """Returning the wrapper's inner layer renames ``stem.0.conv.weight`` to ``stem.0.weight``: the export would
    not load into the dense model after the whole pre-training, so the conversion is refused at once."""
    from spark_sparse.backends import base
    monkeypatch.setitem(base._SHARED_CONVERTERS, _WrappedConv,
                        lambda backend, module, name: backend.convert_module(module.conv, f"{name}.conv"))
    encoder = ss.create_encoder("tiny_cnn")
    encoder.stem[0] = _WrappedConv(encoder.stem[0])   # the stem block's conv
    with pytest.raises(ss.UnsupportedModuleError, match=r"converting the encoder for backend 'sparse' changed its "
                                                        r"weights' names or shapes \(lost stem\.0\.conv\.weight; "
                                                        r"new stem\.0\.weight\)"):
        ss.SparK(encoder, "sparse", input_size=64)
