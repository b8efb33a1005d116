"""timm models as SparK encoders: the shared base and its registration helper.

The timm model itself is kept (``self.model``), created with ``pretrained=False`` and
``num_classes=0``, so parameter names are timm's and :meth:`TimmEncoder.timm_state_dict` loads into
``timm.create_model(name, num_classes=0)`` with ``strict=True``. Only the hierarchical forward is
ours (one subclass per model family, beside the family's layer knowledge): it returns the stage
outputs at strides 4, 8, 16 and 32, finest first, like SparK's.
"""
from __future__ import annotations

import timm
import torch.nn as nn

from .registry import register_model

__all__ = ["TimmEncoder", "register_timm_encoder"]


class TimmEncoder(nn.Module):
    """Base of the timm encoders; subclasses set ``head_modules``, ``densify_norm`` and ``forward``."""

    timm_name: str
    #: children of the timm model the hierarchical forward never calls (classifier heads)
    head_modules: tuple[str, ...] = ()

    def __init__(self, timm_name: str, drop_path_rate: float = 0.0, **kwargs):
        super().__init__()
        self.timm_name = timm_name
        self.model = timm.create_model(timm_name, pretrained=False, num_classes=0,
                                       drop_path_rate=drop_path_rate, **kwargs)

    def get_downsample_ratio(self) -> int:
        return 32

    def get_feature_map_channels(self) -> list[int]:
        return [info["num_chs"] for info in self.model.feature_info if info["reduction"] >= 4]

    def modules_outside_hierarchy(self) -> list[str]:
        """Heads the hierarchical forward never calls: backends leave them as they are."""
        return [f"model.{name}" for name in self.head_modules]

    def timm_state_dict(self) -> dict:
        """Weights as ``timm.create_model(self.timm_name, num_classes=0)`` names them."""
        return self.model.state_dict()

    def load_timm_state_dict(self, state: dict, strict: bool = True):
        return self.model.load_state_dict(state, strict=strict)


def register_timm_encoder(name: str, cls: type[TimmEncoder], drop_path: float) -> None:
    """Register timm model ``name`` as an encoder built by ``cls`` with default drop-path ``drop_path``."""
    def factory(drop_path_rate: float = drop_path, **kwargs) -> nn.Module:
        return cls(name, drop_path_rate=drop_path_rate, **kwargs)
    factory.__name__ = name
    factory.__doc__ = f"timm ``{name}`` as a SparK encoder (default drop-path {drop_path})."
    register_model(name, default_drop_path=drop_path)(factory)
