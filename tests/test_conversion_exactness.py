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


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_subclass_with_other_maths_is_refused_naming_the_module_and_its_type(backend):
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), DoubledConv(8, 8, 3, padding=1))
    with pytest.raises(ss.UnsupportedModuleError, match=r"'1'.*DoubledConv.*subclasses.*Conv2d"):
        ss.create_backend(backend).convert(encoder)


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
