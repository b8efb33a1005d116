"""The kernel plug-in API as a user meets it: registering (again), naming kernels for a backend, the autotune key.

Every kernel registered here is removed again by the ``registry_state`` fixture, so other tests see the
registry as the package leaves it.
"""
from __future__ import annotations

import importlib
import sys

import pytest
import torch

import spark_sparse as ss
from spark_sparse.autotune import AutotuneOptions, autotune, cache
from spark_sparse.backends.auto import sparse_convs
from spark_sparse.backends.registry import create_backend
from spark_sparse.errors import SparkSparseError
from spark_sparse.kernels import (ConvSpec, SparseConvKernel, UnknownKernelError, get_kernel, list_kernels,
                                  register_kernel, registry)
from spark_sparse.kernels.gather import GatherKernel

PLUGIN = "mykern"


@pytest.fixture(autouse=True)
def registry_state():
    """Restore the registry (classes and their shared instances) as it was before the test."""
    kernels, instances, failed = dict(registry._KERNELS), dict(registry._INSTANCES), dict(registry._FAILED_PLUGINS)
    yield
    registry._FAILED_PLUGINS.clear()
    registry._FAILED_PLUGINS.update(failed)
    registry._KERNELS.clear()
    registry._KERNELS.update(kernels)
    registry._INSTANCES.clear()
    registry._INSTANCES.update(instances)


def define_plugin(name: str = PLUGIN) -> type:
    """A user's kernel: gather's maths (so autotune's agreement check passes) under its own name. Each call
    defines the class afresh with the same module and qualified name, as a re-run notebook cell does."""

    class MyKernel(GatherKernel):
        NAME = name

    return MyKernel


class FastestPlugin:
    """Fake timer: the plug-in is the fastest kernel on every layer, gather the slowest of ours."""

    def __init__(self):
        self.layer_candidates: list[str] = []

    def __call__(self, fn, what) -> float:
        if what.kind == "layer":
            self.layer_candidates.append(what.candidate)
            return {PLUGIN: 0.1, "gemm": 1.0, "dense": 2.0}.get(what.candidate, 3.0)
        return {"tuned": 1.0, "static": 2.0}.get(what.candidate, 3.0)


def tiny(backend) -> ss.SparK:
    return ss.create_spark("tiny_cnn", backend=backend, input_size=64, drop_path_rate=0.0)


def conv_spec(conv) -> ConvSpec:
    return ConvSpec.of(conv, "cpu", torch.float32)


def tune(spark, tmp_path, timer):
    options = AutotuneOptions(mode="on", warmup=0, repeats=1, progress=False, cache_dir=tmp_path / "cache",
                              memory_limit=None)
    return autotune(spark, 2, "cpu", options=options, timer=timer,
                    build_masked=lambda: ss.create_spark("tiny_cnn", backend="masked", input_size=64,
                                                         drop_path_rate=0.0))


# ---------------------------------------------------------------------- 1. kernels= limits auto's candidates
def test_auto_with_a_kernel_list_never_times_or_pins_a_kernel_left_out(tmp_path):
    register_kernel(define_plugin())
    spark = tiny(create_backend("auto", kernels=("gemm", "gather")))
    for _, conv in sparse_convs(spark.encoder):
        assert PLUGIN not in conv.candidate_kernels("cpu", torch.float32)
    timer = FastestPlugin()
    result = tune(spark, tmp_path, timer)
    assert timer.layer_candidates and PLUGIN not in timer.layer_candidates
    assert {d.kernel for d in result.decisions.values()} <= {"gemm", "gather", "dense"}


def test_auto_without_a_kernel_list_still_chooses_among_every_registered_kernel():
    register_kernel(define_plugin())
    for _, conv in sparse_convs(tiny("auto").encoder):
        assert PLUGIN in conv.candidate_kernels("cpu", torch.float32) == [
            name for name, cls in list_kernels().items() if not cls.not_supported_reasons(conv_spec(conv))]


def test_the_candidates_of_a_kernel_list_are_the_sparse_rule_for_that_list():
    """Depthwise convs and stems try ``dense`` first under ``sparse``: auto may choose it there too."""
    spark = tiny(create_backend("auto", kernels=("gather",)))
    for _, conv in sparse_convs(spark.encoder):
        spec = conv_spec(conv)
        expected = ["dense", "gather"] if spec.in_channels <= 4 or spec.is_depthwise else ["gather"]
        assert conv.candidate_kernels("cpu", torch.float32) == expected


# ---------------------------------------------------------------------- 2. unknown kernel names
@pytest.mark.parametrize("backend", ["sparse", "auto"])
def test_a_misspelt_kernel_name_is_an_error_naming_the_registered_kernels(backend):
    register_kernel(define_plugin())
    with pytest.raises(UnknownKernelError) as err:
        create_backend(backend, kernels=("mykren", "gemm"))
    message = str(err.value)
    assert isinstance(err.value, SparkSparseError) and isinstance(err.value, KeyError)
    assert "unknown kernel 'mykren' (did you mean 'mykern'?)" in message
    assert all(name in message for name in list_kernels())
    assert not message.startswith("'")          # a one-line message, not KeyError's quoted repr


def test_get_kernel_suggests_a_close_name_too():
    with pytest.raises(UnknownKernelError, match="did you mean 'gemm'"):
        get_kernel("gemn")


def test_a_registered_kernel_that_cannot_run_here_is_skipped_with_its_reason_not_refused():
    class Unavailable(GatherKernel):
        NAME = "needs_libfoo"

        @classmethod
        def availability(cls) -> tuple[bool, str]:
            return False, "libfoo is not importable"

    register_kernel(Unavailable)
    spark = tiny(create_backend("sparse", kernels=("needs_libfoo", "gemm")))
    plan = dict(spark.backend.plan(spark.encoder))
    assert any("skipped needs_libfoo: libfoo is not importable" in how for how in plan.values())


@pytest.mark.parametrize("optional", ["spconv", "minkowski", "triton"])
def test_optional_library_kernels_are_accepted_whether_or_not_their_library_imports(optional):
    create_backend("sparse", kernels=(optional, "gemm", "gather"))


# ---------------------------------------------------------------------- 3. registering again
def test_registering_the_same_kernel_defined_again_replaces_it():
    first = register_kernel(define_plugin())
    assert type(get_kernel(PLUGIN)) is first
    second = register_kernel(define_plugin())
    assert second is not first and list_kernels()[PLUGIN] is second
    assert type(get_kernel(PLUGIN)) is second           # the old definition's instance is not served


def test_another_class_claiming_a_taken_name_is_refused():
    register_kernel(define_plugin())

    class Impostor(GatherKernel):
        NAME = PLUGIN

    with pytest.raises(ValueError, match=r"kernel 'mykern' is already registered by .*define_plugin.<locals>.MyKernel"):
        register_kernel(Impostor)


# ---------------------------------------------------------------------- 4. NAME missing
def test_a_kernel_class_without_a_name_is_a_clear_error():
    class K(SparseConvKernel):
        pass

    with pytest.raises(TypeError, match="a kernel class needs NAME"):
        register_kernel(K)
    assert "K" not in list_kernels()


# ---------------------------------------------------------------------- 5. plug-in source in the cache key
PLUGIN_SOURCE = """
from spark_sparse.kernels import register_kernel
from spark_sparse.kernels.gather import GatherKernel


@register_kernel
class MyKernel(GatherKernel):
    NAME = "mykern"
    DESCRIPTION = {description!r}
"""


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """Write the plug-in module as its author would (``write(description)``), importing or reloading it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "my_kernel_plugin.py"

    def write(description: str) -> None:
        path.write_text(PLUGIN_SOURCE.format(description=description))
        if "my_kernel_plugin" in sys.modules:
            importlib.reload(sys.modules["my_kernel_plugin"])
        else:
            importlib.import_module("my_kernel_plugin")

    yield write
    sys.modules.pop("my_kernel_plugin", None)


def test_without_plugins_the_environment_key_is_what_it_was():
    assert not cache.plugin_kernels_digests()
    assert set(cache.environment_key("cpu")) == {"device_type", "device", "torch", "libraries", "kernels", "threads"}


def test_a_plugin_whose_code_changed_is_measured_again_and_an_unchanged_one_is_not(tmp_path, plugin_module):
    def auto():         # two candidates per layer (three on the stem) keep the measuring short
        return tiny(create_backend("auto", kernels=(PLUGIN, "gather")))

    plugin_module("first version")
    first = cache.environment_key("cpu")
    assert set(first["plugin_kernels"]) == {PLUGIN}
    tune(auto(), tmp_path, FastestPlugin())
    unchanged = FastestPlugin()
    tune(auto(), tmp_path, unchanged)
    assert not unchanged.layer_candidates

    plugin_module("edited")                                 # reloading registers the edited class again
    assert cache.environment_key("cpu")["plugin_kernels"] != first["plugin_kernels"]
    changed = FastestPlugin()
    tune(auto(), tmp_path, changed)
    assert PLUGIN in changed.layer_candidates


def test_a_plugin_without_readable_source_is_keyed_by_its_module_and_name():
    made = type("MadeAtRunTimeKernel", (GatherKernel,), {"NAME": "made_at_run_time"})
    register_kernel(made)
    assert len(cache.plugin_kernels_digests()["made_at_run_time"]) == 16


def test_a_kernel_returning_rows_of_another_shape_is_named_with_its_layer():
    class ReturnsItsInput(GatherKernel):
        NAME = "returns_its_input"

        def conv(self, features, weight, bias, call):
            return features                       # the input rows: other row count and channels than the output

    register_kernel(ReturnsItsInput)
    spark = ss.create_spark("tiny_cnn", backend=create_backend("sparse", kernels=("returns_its_input",)),
                            input_size=64)
    # the stem runs on dense (sparse's rule for stems): the first conv on the plug-in is the first stage's
    with pytest.raises(RuntimeError, match=r"kernel 'returns_its_input' returned rows of shape \(1024, 16\) for "
                                           r"layer stages\.0\.0\.0, which needs \(256, 16\) \(the active sites"):
        spark(torch.randn(2, 3, 64, 64))


# ---------------------------------------------------------------------- 6. plug-ins found by entry point
class FakeEntryPoint:
    """What ``importlib.metadata.entry_points`` yields for an installed plug-in package."""

    def __init__(self, name: str, value: str, load):
        self.name, self.value, self.load = name, value, load


def broken_import():
    raise ImportError("No module named 'cupy'")


def test_a_plugin_that_failed_to_load_is_named_with_its_error_when_its_kernel_is_asked_for(monkeypatch):
    entry = FakeEntryPoint(PLUGIN, "my_kernels.module:MyKernel", broken_import)
    monkeypatch.setattr(registry, "entry_points", lambda group: [entry] if group == registry.PLUGIN_GROUP else [])
    with pytest.warns(RuntimeWarning, match="kernel plugin 'mykern' .* failed to load and is skipped"):
        assert registry.load_kernel_plugins() == [PLUGIN]
    with pytest.raises(UnknownKernelError, match=r"kernel 'mykern' is not registered: its plugin my_kernels\.module:"
                                                 r"MyKernel failed to load when spark_sparse was imported: ImportError: "
                                                 r"No module named 'cupy'"):
        create_backend("sparse", kernels=("gemm", PLUGIN))


def test_a_plugin_that_loads_registers_its_kernel_and_forgets_an_earlier_failure(monkeypatch):
    outcomes = iter([broken_import, lambda: register_kernel(define_plugin())])
    monkeypatch.setattr(registry, "entry_points",
                        lambda group: [FakeEntryPoint(PLUGIN, "my_kernels.module:MyKernel", next(outcomes))])
    with pytest.warns(RuntimeWarning):
        registry.load_kernel_plugins()
    assert registry.load_kernel_plugins() == []
    assert PLUGIN in list_kernels() and PLUGIN not in registry._FAILED_PLUGINS
    create_backend("sparse", kernels=(PLUGIN,))
