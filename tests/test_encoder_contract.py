"""A user's encoder that breaks SparK's contract is named at creation, with the promise it breaks."""
import warnings

import pytest
import torch

import spark_sparse as ss
from spark_sparse.errors import ConfigError, SparkSparseError
from spark_sparse.models import registry
from spark_sparse.models.contract import check_encoder
from spark_sparse.models.example import TinyCNN


class DeclaresOtherChannels(TinyCNN):
    def get_feature_map_channels(self):
        return [c * 2 for c in self.widths]


class CoarsestFirst(TinyCNN):
    def forward(self, x, hierarchical=True):
        return super().forward(x)[::-1]


class ClaimsStride16(TinyCNN):
    def get_downsample_ratio(self):
        return 16


class RatioNotAPowerOfTwo(TinyCNN):
    def get_downsample_ratio(self):
        return 24


class ReturnsOneTensor(TinyCNN):
    def forward(self, x, hierarchical=True):
        return super().forward(x)[-1]


class ForwardWithoutHierarchical(TinyCNN):
    def forward(self, x):
        return super().forward(x)


class NeedsLargeImages(TinyCNN):
    """A net whose forward fails below 224 px: the probe cannot judge it and must not refuse it."""

    def forward(self, x, hierarchical=True):
        if x.shape[-1] < 224:
            raise RuntimeError("this net needs 224 px")
        return super().forward(x, hierarchical)


@pytest.fixture
def user_model():
    """Register a factory as a user's model (outside this package) for one test."""
    names = []

    def register(encoder_class, takes_drop_path=True, ignores_drop_path=False):
        name = f"contract_test_{encoder_class.__name__.lower()}_{len(names)}"
        if ignores_drop_path:                   # as the README's example does: takes the rate, builds no DropPath
            def factory(drop_path_rate=0.0, **kwargs):
                return encoder_class(widths=(8, 8, 16, 16))
        elif takes_drop_path:
            def factory(drop_path_rate=0.0, **kwargs):
                return encoder_class(widths=(8, 8, 16, 16), drop_path_rate=drop_path_rate)
        else:
            def factory(widths=(8, 8, 16, 16)):
                return encoder_class(widths=widths)
        factory.__module__ = "my_models"
        ss.register_model(name)(factory)
        names.append(name)
        return name

    yield register
    for name in names:
        registry._MODELS.pop(name, None)
        registry._DEFAULT_DROP_PATH.pop(name, None)


@pytest.mark.parametrize("encoder_class, message", [
    (DeclaresOtherChannels, "forward returned maps (C x H x W) 8x16x16, 8x8x8, 16x4x4, 16x2x2, but its "
                            "get_feature_map_channels() [16, 16, 32, 32] and get_downsample_ratio() 32 promise "
                            "16x16x16, 16x8x8, 32x4x4, 32x2x2"),
    (CoarsestFirst, "returned maps (C x H x W) 16x2x2, 16x4x4, 8x8x8, 8x16x16"),
    (ClaimsStride16, "get_downsample_ratio() 16 promise 8x16x16, 8x8x8, 16x4x4, 16x2x2"),
    (RatioNotAPowerOfTwo, "get_downsample_ratio() must return the stride of its coarsest map, a power of two"),
    (ReturnsOneTensor, "must return a list of [B, C, H, W] feature maps, finest first; got Tensor"),
    (ForwardWithoutHierarchical, "its forward must take a keyword argument 'hierarchical'"),
])
def test_a_broken_promise_is_named_at_creation(encoder_class, message, user_model):
    with pytest.raises(ss.EncoderContractError) as error:
        ss.create_spark(user_model(encoder_class), input_size=64)
    assert message in str(error.value)


class NoDownsampleRatio(torch.nn.Module):
    def __init__(self, widths, drop_path_rate=0.0):
        super().__init__()

    def get_feature_map_channels(self):
        return [8, 8, 16, 16]

    def forward(self, x, hierarchical=True):
        return [x]


def test_a_missing_contract_method_is_named(user_model):
    with pytest.raises(ss.EncoderContractError, match=r"its NoDownsampleRatio has no get_downsample_ratio method$"):
        ss.create_spark(user_model(NoDownsampleRatio), input_size=64)


def test_a_factory_without_drop_path_rate_is_named(user_model):
    with pytest.raises(ss.EncoderContractError, match=r"\(widths=\(8, 8, 16, 16\)\) does not accept drop_path_rate; "
                                                      r"give it a drop_path_rate=0.0 parameter \(or \*\*kwargs\)"):
        ss.create_encoder(user_model(TinyCNN, takes_drop_path=False))


def test_a_factory_passing_drop_path_rate_to_a_constructor_without_it_is_named():
    class NoDropPath(TinyCNN):
        def __init__(self, widths=(8, 8, 16, 16)):
            super().__init__(widths=widths)

    @ss.register_model("contract_test_kwargs_factory")
    def factory(**kwargs):
        return NoDropPath(**kwargs)

    try:
        with pytest.raises(ss.EncoderContractError, match=r"building it with drop_path_rate=0.0 failed .*the factory "
                                                          r"must take drop_path_rate .* and may ignore it"):
            ss.create_encoder("contract_test_kwargs_factory")
    finally:
        registry._MODELS.pop("contract_test_kwargs_factory", None)
        registry._DEFAULT_DROP_PATH.pop("contract_test_kwargs_factory", None)


def test_a_sound_encoder_is_probed_without_a_trace(user_model):
    encoder = ss.create_encoder(user_model(TinyCNN))
    assert encoder.training
    statistics = [buffer.clone() for buffer in encoder.buffers()]
    check_encoder(encoder, "again")
    assert encoder.training and all(torch.equal(a, b) for a, b in zip(statistics, encoder.buffers()))
    assert all(p.grad is None for p in encoder.parameters())


def test_a_forward_the_probe_cannot_run_is_left_to_the_run(user_model):
    assert isinstance(ss.create_encoder(user_model(NeedsLargeImages)), NeedsLargeImages)


def test_too_many_maps_for_the_ratio_are_named():
    encoder = TinyCNN(widths=(8, 8, 16, 16, 16, 16))
    with pytest.raises(ss.EncoderContractError, match="6 feature maps, but a downsample ratio of 32 leaves room "
                                                      "for 5 .strides 2, 4, 8, 16, 32"):
        check_encoder(encoder, "too_deep")


def test_the_packages_own_families_are_not_probed(monkeypatch):
    probed = []
    monkeypatch.setattr("spark_sparse.models.contract._probe", lambda encoder, ratio: probed.append(ratio))
    ss.create_encoder("resnet18")
    ss.create_encoder("tiny_cnn")
    assert probed == []


def test_a_broken_user_model_is_one_line_from_the_cli(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import spark_sparse.cli as cli
    from apptools import make_image_folder

    (tmp_path / "my_broken_models.py").write_text(
        "import spark_sparse as ss\n"
        "from spark_sparse.models.example import TinyCNN\n\n"
        "class Wrong(TinyCNN):\n"
        "    def get_feature_map_channels(self):\n"
        "        return [1, 2, 3, 4]\n\n"
        "@ss.register_model('contract_test_cli_wrong')\n"
        "def wrong(drop_path_rate=0.0):\n"
        "    return Wrong(drop_path_rate=drop_path_rate)\n")
    data = make_image_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    try:
        result = CliRunner().invoke(cli.pretrain_command, [
            "x", f"--data_path={data}", "--import_module=my_broken_models.py", "--model=contract_test_cli_wrong",
            "--input_size=64", "--bs=4", "--device=cpu", f"--exp_dir={tmp_path / 'out'}"])
    finally:
        registry._MODELS.pop("contract_test_cli_wrong", None)
    assert result.exit_code == 1 and result.output.startswith("Error: model 'contract_test_cli_wrong': for a 64x64 "
                                                              "image its forward returned maps"), result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_the_readme_model_runs_as_pasted(tmp_path):
    """README's "Your own model" block is a complete file: imported as a user's module, it builds, passes the
    contract probe and gives masked's loss on sparse."""
    from pathlib import Path

    from spark_sparse.user_modules import import_user_module

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Your own model"):]
    block = section[section.index("```python\n") + len("```python\n"):]
    (tmp_path / "readme_models.py").write_text(block[:block.index("```")])
    try:
        import_user_module(str(tmp_path / "readme_models.py"))
        images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        masked = ss.create_spark("my_cnn", "masked", input_size=64)
        sparse = ss.create_spark("my_cnn", "sparse", input_size=64)
        sparse.load_state_dict(masked.state_dict())
        mask = masked.mask(2, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(sparse(images, mask), masked(images, mask), rtol=1e-5, atol=1e-6)
    finally:
        registry._MODELS.pop("my_cnn", None)
        registry._DEFAULT_DROP_PATH.pop("my_cnn", None)


def test_the_bare_decorator_registers_as_timms_does():
    @ss.register_model
    def contract_test_bare_decorator(drop_path_rate=0.0, **kwargs):
        return TinyCNN(widths=(8, 8, 16, 16))

    try:
        assert callable(contract_test_bare_decorator) and contract_test_bare_decorator.__name__ == \
            "contract_test_bare_decorator"
        assert "contract_test_bare_decorator" in ss.list_models()
    finally:
        registry._MODELS.pop("contract_test_bare_decorator", None)
        registry._DEFAULT_DROP_PATH.pop("contract_test_bare_decorator", None)


class ReflectPadded(TinyCNN):
    """A user's net with a padding mode the sparse backends cannot reproduce."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stem[0].padding_mode = "reflect"


def test_a_layer_setting_a_backend_cannot_run_is_one_error_naming_the_way_out(user_model):
    name = user_model(ReflectPadded)
    with pytest.raises(SparkSparseError, match=r"padding_mode='reflect'.*use --backend masked") as err:
        ss.create_spark(name, backend="sparse", input_size=64)
    assert isinstance(err.value, NotImplementedError)
    ss.create_spark(name, backend="masked", input_size=64)         # masked runs it


def test_a_drop_path_the_users_model_ignores_is_warned_about(user_model):
    """The contract lets a factory ignore drop_path_rate (a net without stochastic depth); asked for one, a model that
    holds no DropPath layer is warned about, since --dp would then do nothing."""
    ignores = user_model(TinyCNN, takes_drop_path=False, ignores_drop_path=True)
    with pytest.warns(UserWarning, match=rf"model '{ignores}' was asked for drop path 0.1 \(--dp\) but holds no "
                                         r"DropPath layer"):
        ss.create_encoder(ignores, drop_path_rate=0.1)
    uses = user_model(TinyCNN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ss.create_encoder(uses, drop_path_rate=0.1)        # its blocks hold DropPath layers
        ss.create_encoder(ignores, drop_path_rate=0.0)     # nothing asked, nothing ignored


def test_a_name_another_factory_holds_is_refused_naming_both_and_a_module_run_again_is_not():
    def factory(drop_path_rate=0.0, **kwargs):
        return TinyCNN(widths=(8, 8, 16, 16))

    factory.__module__ = "my_models"
    with pytest.raises(ss.ModelNameTakenError, match=r"model 'resnet50' is already registered, by spark_sparse\.models\."
                                                     r"timm_encoders\.register_timm_encoder\.<locals>\.resnet50; register "
                                                     r"my_models\..*factory under "
                                                     r"another name, e.g. @register_model\('my_resnet50'\)"):
        ss.register_model("resnet50")(factory)

    def my_cnn(drop_path_rate=0.0, **kwargs):
        return TinyCNN(widths=(8, 8, 16, 16))

    def my_cnn_again(drop_path_rate=0.0, **kwargs):      # the same function after its module (a notebook cell) runs again
        return TinyCNN(widths=(8, 8, 16, 16))

    my_cnn.__module__ = my_cnn_again.__module__ = "my_models"
    my_cnn_again.__qualname__ = my_cnn.__qualname__ = "my_cnn"
    try:
        ss.register_model("contract_test_rerun")(my_cnn)
        ss.register_model("contract_test_rerun")(my_cnn_again)
        assert registry._MODELS["contract_test_rerun"] is my_cnn_again
    finally:
        registry._MODELS.pop("contract_test_rerun", None)
        registry._DEFAULT_DROP_PATH.pop("contract_test_rerun", None)


def test_two_factories_made_by_one_maker_are_two_and_an_alias_cannot_be_registered():
    def maker(width):
        def factory(drop_path_rate=0.0, **kwargs):
            return TinyCNN(widths=(width,) * 4)
        return factory

    try:
        ss.register_model("contract_test_made")(maker(8))
        with pytest.raises(ss.ModelNameTakenError, match=r"'contract_test_made' is already registered, by "
                                                         r".*maker\.<locals>\.factory"):
            ss.register_model("contract_test_made")(maker(16))
    finally:
        registry._MODELS.pop("contract_test_made", None)
        registry._DEFAULT_DROP_PATH.pop("contract_test_made", None)
    with pytest.raises(ss.ModelNameTakenError, match=r"model 'res50' cannot be registered: it is SparK's short name "
                                                     r"for 'resnet50' \(--model=res50 builds that\)"):
        ss.register_model("res50")(maker(8))
    assert "res50" not in registry._MODELS


def test_registering_a_timm_models_name_warns_that_it_shadows_timms():
    def resnet26d(drop_path_rate=0.0, **kwargs):
        return TinyCNN(widths=(8, 8, 16, 16))

    resnet26d.__module__ = "my_models"
    assert "resnet26d" not in registry._MODELS
    try:
        with pytest.warns(UserWarning, match=r"model 'resnet26d' registered by my_models\..*resnet26d shadows timm's "
                                             r"'resnet26d': --model resnet26d now builds yours"):
            ss.register_model(resnet26d)
        assert isinstance(ss.create_spark("resnet26d", input_size=64).encoder, TinyCNN)
    finally:
        registry._MODELS.pop("resnet26d", None)
        registry._DEFAULT_DROP_PATH.pop("resnet26d", None)


def test_create_spark_takes_a_built_encoder_checked_as_a_registered_one(user_model):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    by_name = ss.create_spark(user_model(TinyCNN), "sparse", input_size=64)
    built = ss.create_spark(TinyCNN(widths=(8, 8, 16, 16)), "sparse", input_size=64)
    built.load_state_dict(by_name.state_dict())
    mask = by_name.mask(2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(built(images, mask), by_name(images, mask), rtol=0, atol=0)
    with pytest.raises(ss.EncoderContractError, match=r"model 'CoarsestFirst': .*returned maps \(C x H x W\) 16x2x2"):
        ss.create_spark(CoarsestFirst(widths=(8, 8, 16, 16)), input_size=64)
    with pytest.raises(ss.EncoderContractError, match=r"its Conv2d has no get_downsample_ratio and no "
                                                      r"get_feature_map_channels method"):
        ss.create_spark(torch.nn.Conv2d(3, 8, 1), input_size=64)
    with pytest.raises(ConfigError, match=r"given a built TinyCNN, so drop_path_rate, stem_width cannot reach"):
        ss.create_spark(TinyCNN(), drop_path_rate=0.1, stem_width=4)
    with pytest.raises(TypeError, match=r"a registered model's name or an encoder module, got int"):
        ss.create_spark(50)


def test_a_built_encoder_serves_one_spark_model_and_compare_with_masked_copies_it():
    """create_spark converts a built encoder in place (it trains as the model's own): a second model from it is
    refused, before anything changes it, however the first conversion ended."""
    from spark_sparse.testing import compare_with_masked

    encoder = TinyCNN(widths=(8, 8, 16, 16))
    with pytest.raises(ConfigError, match=r"decoder width 16: an int of at least 32"):
        ss.create_spark(encoder, "masked", input_size=64, decoder_width=16)     # refused before converting
    spark = ss.create_spark(encoder, "masked", input_size=64)
    assert spark.encoder is encoder
    for again in (lambda: ss.create_spark(encoder, "sparse", input_size=64),
                  lambda: ss.SparK(encoder, "sparse", input_size=64, sync_bn=True)):
        with pytest.raises(ss.UnsupportedModuleError, match=r"this TinyCNN was converted for backend 'masked' already "
                                                            r".*build a new instance for each SparK model, or pass "
                                                            r"copy.deepcopy of the dense one"):
            again()
    report = compare_with_masked(TinyCNN(widths=(8, 8, 16, 16)), "sparse")
    report.assert_close()
    assert report.model == "TinyCNN" and report.ok


def test_a_module_registering_a_taken_name_is_one_line_from_the_cli(tmp_path):
    from click.testing import CliRunner

    import spark_sparse.cli as cli

    (tmp_path / "taken_name_models.py").write_text(
        "import spark_sparse as ss\n"
        "from spark_sparse.models.example import TinyCNN\n\n"
        "@ss.register_model('resnet50')\n"
        "def mine(drop_path_rate=0.0):\n"
        "    return TinyCNN(drop_path_rate=drop_path_rate)\n")
    result = CliRunner().invoke(cli.pretrain_command, [
        "x", f"--data_path={tmp_path}", f"--import_module={tmp_path / 'taken_name_models.py'}", "--model=resnet50"])
    assert result.exit_code == 2 and "taken_name_models.py: model 'resnet50' is already registered" in result.output
    assert "Traceback" not in result.output
