"""``spark_sparse.testing.compare_with_masked``: passes for a backend that computes SparK's maths, and reports
a large error for plug-ins that do not (a kernel with its taps flipped, a converter that fills masked sites);
README's "Extending spark-sparse" blocks run as pasted.

Every converter, container, kernel, model and backend registered here is removed again by the ``registries``
fixture, so other tests see the registries as the package leaves them.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn as nn

import spark_sparse as ss
from spark_sparse import FeatureMap
from spark_sparse.backends import base as backend_base
from spark_sparse.backends import registry as backend_registry
from spark_sparse.kernels import ConvCall, register_kernel
from spark_sparse.kernels import registry as kernel_registry
from spark_sparse.kernels.gather import GatherKernel
from spark_sparse.models import registry as model_registry
from spark_sparse.testing import ComparisonError, compare_with_masked


@pytest.fixture
def registries():
    """Restore every registry a plug-in adds to (converters, same-maths classes, containers, kernels, their
    instances and failed plug-ins, models, their drop paths, tested names and fallbacks, backends) afterwards."""
    tables = [backend_base._SHARED_CONVERTERS, backend_base._SAME_MATHS, backend_base._CONTAINERS,
              kernel_registry._KERNELS, kernel_registry._INSTANCES, kernel_registry._FAILED_PLUGINS,
              model_registry._MODELS, model_registry._DEFAULT_DROP_PATH, model_registry._TESTED,
              model_registry._FALLBACKS, backend_registry._BACKENDS]
    saved = [table.copy() for table in tables]
    yield
    for table, before in zip(tables, saved):
        table.clear()
        if isinstance(table, list):
            table.extend(before)
        else:
            table.update(before)


@pytest.mark.parametrize("model", ["tiny_cnn", "resnet18"])
def test_the_sparse_backend_matches_masked_on_every_quantity(model):
    rng = torch.random.get_rng_state()
    report = compare_with_masked(model, "sparse")
    assert torch.equal(torch.random.get_rng_state(), rng)                      # the caller's RNG is left alone
    report.assert_close()
    assert report.ok and not report.mismatches
    assert report.masked_sites_nonzero == report.reference_masked_sites_nonzero == 0
    spark = ss.create_spark(model, input_size=64, decoder_width=64)
    compared = {name for name in report.deviations if name.startswith("grad ") and name != "grad input"}
    assert compared == {f"grad {name}" for name, _ in spark.named_parameters()}      # every parameter's gradient
    assert {f"buffer {name}" for name, _ in spark.named_buffers()} <= set(report.deviations)
    assert {"loss", "grad input", *(f"feature {i}" for i in range(4))} <= set(report.deviations)
    assert "sparse vs masked" in str(report) and report.ran_on()["gemm"] > 0


def test_a_kernel_with_flipped_taps_is_reported(registries):
    @register_kernel
    class FlippedTaps(GatherKernel):                # correlation taken for convolution: the taps reversed
        NAME = "flipped_taps"

        def conv(self, features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 call: ConvCall) -> torch.Tensor:
            return super().conv(features, weight.flip(-1, -2), bias, call)

    report = compare_with_masked("tiny_cnn", ss.create_backend("sparse", kernels=("flipped_taps", "gemm")))
    assert report.ran_on()["flipped_taps"] > 0
    assert not report.ok
    name, worst = report.worst()
    assert worst.max_rel > 1e-2, (name, worst)
    assert report.deviations["feature 3"].max_rel > 1e-2
    with pytest.raises(AssertionError, match="feature 3: max abs error"):
        report.assert_close()


class Shift(nn.Module):
    """A dense layer the backends do not know: adds one learnt number everywhere."""

    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift


class FeatureShift(nn.Module):
    def __init__(self, dense: Shift, per_site: bool):
        super().__init__()
        self.shift, self.per_site = dense.shift, per_site

    def forward(self, x: FeatureMap) -> FeatureMap:
        # SparK's semantics: active sites only. elementwise() is for functions with f(0) == 0: on 'masked' it
        # reaches the masked sites too, so the shift fills them there and the next conv reads it
        return x.per_site(lambda v: v + self.shift) if self.per_site else x.elementwise(lambda v: v + self.shift)


class ShiftNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (8, 16, 32, 64)):
        super().__init__()
        self.widths = list(widths)
        self.stages = nn.ModuleList(nn.Sequential(nn.Conv2d(cin, cout, 3, 4 if i == 0 else 2, 1), Shift(), nn.ReLU())
                                    for i, (cin, cout) in enumerate(zip([3, *widths[:-1]], widths)))

    def get_downsample_ratio(self) -> int:
        return 32

    def get_feature_map_channels(self) -> list[int]:
        return self.widths

    def forward(self, x, hierarchical: bool = True):
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features if hierarchical else x


@pytest.mark.parametrize("per_site", [True, False], ids=["per_site", "elementwise"])
def test_a_converter_that_fills_masked_sites_is_reported(registries, per_site):
    ss.register_container(ShiftNet)
    ss.register_converter(Shift)(lambda backend, module, name: FeatureShift(module, per_site))
    report = compare_with_masked(lambda backend: ss.SparK(ShiftNet(), backend, input_size=64, decoder_width=64),
                                 "sparse")
    assert report.model == "ShiftNet"
    if per_site:
        report.assert_close()
        return
    assert report.reference_masked_sites_nonzero > 0 and report.masked_sites_nonzero == 0
    assert report.deviations["feature 1"].max_rel > 1e-2
    with pytest.raises(AssertionError, match="not 0 on 'masked'"):
        report.assert_close()


def test_a_backend_that_refuses_float64_says_so_and_compares_in_float32(registries):
    @register_kernel
    class Float32Only(GatherKernel):
        NAME = "float32_only"
        SUPPORTED_DTYPES = frozenset({torch.float32})

    with pytest.raises(ComparisonError, match="failed in float64.*dtype=torch.float32"):
        compare_with_masked("tiny_cnn", ss.create_backend("torch", kernels=("float32_only",)))
    report = compare_with_masked("tiny_cnn", ss.create_backend("torch", kernels=("float32_only",)), dtype=torch.float32)
    report.assert_close()
    assert report.ran_on()["float32_only"] > 0 and report.dtype == torch.float32


def test_the_readme_extension_blocks_run_as_pasted(registries, tmp_path, monkeypatch):
    """README's "Extending spark-sparse": its first Python blocks together are ``myplugin.py``, the last one
    checks it (the plug-in backend on its model, the plug-in kernel on resnet18) and must pass."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Extending spark-sparse"):readme.index("## Checkpoints")]
    *plugin, check = re.findall(r"```python\n(.*?)```", section, re.S)
    (tmp_path / "myplugin.py").write_text("\n\n".join(plugin))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        exec(compile(check, "check_myplugin.py", "exec"), {})
        assert compare_with_masked("offset_cnn", "mine").ran_on()["loop"] == 3
    finally:
        sys.modules.pop("myplugin", None)
