"""Conversion is exact or refuses: converters apply to the types they declare, never to subclasses."""
import copy

import pytest
import torch
import torch.nn as nn

import spark_sparse as ss
from spark_sparse import ActiveMask

from equivalence import sparse_backend_params

ALL_BACKENDS = [pytest.param("masked", id="masked")] + sparse_backend_params()


class DoubledConv(nn.Conv2d):
    """A Conv2d subclass with other maths: converting it as a plain Conv2d would silently drop the x2."""

    def forward(self, x):
        return 2 * super().forward(x)


class NamedConv(nn.Conv2d):
    """A Conv2d subclass with its base's maths (a helper method, no forward of its own)."""

    def describe(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_subclass_with_other_maths_is_refused_naming_the_module_and_its_type(backend):
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), DoubledConv(8, 8, 3, padding=1))
    with pytest.raises(ss.UnsupportedModuleError, match=r"'1'.*DoubledConv.*subclasses.*Conv2d.*declare it: "
                                                        r"spark_sparse\.register_same_maths\(DoubledConv, Conv2d\)"):
        ss.create_backend(backend).convert(encoder)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_subclass_declared_with_its_bases_maths_runs_as_its_base(backend, monkeypatch):
    from spark_sparse.backends import base
    monkeypatch.setattr(base, "_SAME_MATHS", {})
    assert ss.register_same_maths(NamedConv, nn.Conv2d) is NamedConv
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    named = copy.deepcopy(plain)
    named[1].__class__ = NamedConv
    mask = ActiveMask.random(2, (2, 2), 0.5, generator=torch.Generator().manual_seed(0))
    images = torch.randn(2, 3, 64, 64)
    outputs = {}
    for label, model in (("plain", plain), ("named", named)):
        backend_obj = ss.create_backend(backend)
        converted = backend_obj.convert(model)
        outputs[label] = converted(backend_obj.features_from_image(images, mask)).to_dense()
    assert torch.equal(outputs["named"], outputs["plain"]) and set(named.state_dict()) == set(plain.state_dict())


def test_a_subclass_with_a_forward_of_its_own_cannot_be_declared_with_its_bases_maths():
    with pytest.raises(ValueError, match="DoubledConv defines its own forward"):
        ss.register_same_maths(DoubledConv, nn.Conv2d)
    with pytest.raises(TypeError, match="takes a module class and one of its bases"):
        ss.register_same_maths(nn.Conv2d, NamedConv)


def test_register_converter_refuses_what_would_never_run_or_a_bare_use():
    with pytest.raises(ValueError, match=r"Conv2d is converted by the backends themselves \(.*masked.*\): a "
                                         r"registered converter would never run"):
        ss.register_converter(nn.Conv2d)
    with pytest.raises(TypeError, match=r"register_converter takes the module classes it converts"):
        ss.register_converter(lambda backend, module, name: module)        # bare on a function
    as_decorator = ss.register_converter(NamedConv)                         # what a bare use on the class leaves
    with pytest.raises(TypeError, match=r"decorates a converter, .* it was given int and more arguments \(used bare "
                                        r"on a layer class"):
        as_decorator(3, 8, 3)                                               # the user's NamedConv(3, 8, 3)
    with pytest.raises(TypeError, match=r"it was given NamedConv"):
        as_decorator(NamedConv)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_grouped_1x1_conv_after_a_stem_runs_and_matches_masked(backend):
    """The shape of the reported crash: Conv2d(3, 64) then Conv2d(64, 64, 1, groups=4)."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 64, 3, stride=4, padding=1), nn.Conv2d(64, 64, 1, groups=4))
    mask = ActiveMask.random(2, (2, 2), 0.5, generator=torch.Generator().manual_seed(0))
    images = torch.randn(2, 3, 64, 64)
    outputs = {}
    for name in ("masked", backend):
        backend_obj = ss.create_backend(name)
        model = backend_obj.convert(copy.deepcopy(reference))
        outputs[name] = model(backend_obj.features_from_image(images, mask)).to_dense()
    torch.testing.assert_close(outputs[backend], outputs["masked"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_an_activation_that_is_not_zero_at_zero_is_refused_saying_so(backend):
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sigmoid())
    with pytest.raises(ss.UnsupportedModuleError, match=r"'1' of type torch\.nn\.modules\.activation\.Sigmoid: "
                                                        r"sigmoid\(0\) = 0\.5, so on the dense map it would fill "
                                                        r"the masked sites"):
        ss.create_backend(backend).convert(encoder)


class _HandWrittenSqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.pool, self.fc, self.gate = nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, 1), nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.fc(self.pool(x)))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_hand_written_gate_is_refused_pointing_at_timms_converted_ones(backend):
    """Unregistered: the generic message gains the hint; registered as a container: its global pool is named."""
    hint = r"squeeze-excitation or attention gate written by hand .* timm's SEModule, EffectiveSEModule or EcaModule"
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _HandWrittenSqueezeExcite(8))
    with pytest.raises(ss.UnsupportedModuleError, match=r"'1' of type .*_HandWrittenSqueezeExcite: it is neither .*"
                                                        + hint):
        ss.create_backend(backend).convert(copy.deepcopy(encoder))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("spark_sparse.backends.base._CONTAINERS", {*ss.backends.base._CONTAINERS, _HandWrittenSqueezeExcite})
        with pytest.raises(ss.UnsupportedModuleError, match=r"'1\.pool' of type .*AdaptiveAvgPool2d: a pool to a fixed "
                                                            r"size over SparK's masked map would take its masked zeros "
                                                            r"in.*" + hint):
            ss.create_backend(backend).convert(copy.deepcopy(encoder))


def test_a_backend_without_what_models_need_is_refused_at_registration():
    class Bare(ss.Backend):
        name = "bare_test_backend"

    with pytest.raises(TypeError, match=r"backend class .*Bare needs a non-empty `name` and a `feature_type`"):
        ss.register_backend(Bare)
    assert "bare_test_backend" not in {info.name for info in ss.list_backends()}


def test_a_layer_one_backend_converts_itself_can_still_get_a_shared_converter_for_the_others(monkeypatch):
    """Order does not matter: a user's backend converting its layer itself leaves the shared converter to the others."""
    from spark_sparse.backends import base, registry
    from spark_sparse.backends.sparse import SparseBackend

    class OwnLayer(nn.Identity):
        pass

    class OwnBackend(SparseBackend):
        name = "own_layer_test_backend"
        converters = {**SparseBackend.converters, OwnLayer: lambda backend, module, name: module}

    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
    monkeypatch.setattr(base, "_SHARED_CONVERTERS", dict(base._SHARED_CONVERTERS))
    ss.register_backend(OwnBackend)
    shared = ss.register_converter(OwnLayer)(lambda backend, module, name: module)
    assert base._SHARED_CONVERTERS[OwnLayer] is shared
