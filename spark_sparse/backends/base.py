"""The backend interface and the module-conversion walk every backend shares.

A backend converts a dense encoder module tree in place: each leaf module with its own compute is
replaced by a module that consumes and returns :class:`~spark_sparse.features.FeatureMap` objects
(the replacement keeps the original parameter names, so state dicts stay timm's). Composite modules
whose ``forward`` only calls their children and adds results (``nn.Sequential``, timm's
``Bottleneck``, ...) are kept as they are and recursed into. A module type that is neither known
to the backend nor a known container is an error naming the module, never silently dense.
"""
from __future__ import annotations

from typing import Callable, ClassVar, Optional

import torch
import torch.nn as nn

from ..features import FeatureMap
from ..mask import ActiveMask

__all__ = ["Backend", "UnsupportedModuleError", "register_container", "is_container", "Converter"]

#: ``(backend, module, qualified name) -> replacement module``
Converter = Callable[["Backend", nn.Module, str], nn.Module]

_CONTAINERS: set[type] = {nn.Sequential, nn.ModuleList, nn.ModuleDict}


class UnsupportedModuleError(TypeError):
    pass


def register_container(cls: type) -> type:
    """Declare that ``cls.forward`` only composes its children and ``+``.

    Such modules run unchanged on every backend (their children are converted). Use it as a class
    decorator for the blocks of a custom encoder.
    """
    _CONTAINERS.add(cls)
    return cls


def is_container(module: nn.Module) -> bool:
    return type(module) in _CONTAINERS


class Backend:
    """Base of every backend. Subclasses set ``name``, ``description`` and ``converters``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: module type -> converter; looked up by exact type first, then along the MRO.
    converters: ClassVar[dict[type, Converter]] = {}
    #: the :class:`FeatureMap` class this backend's modules consume
    feature_type: ClassVar[type[FeatureMap]]

    def __init__(self, strict: bool = False):
        #: with ``strict``, a layer that cannot run on the backend's preferred kernel is an error
        self.strict = strict

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """``(True, "")`` or ``(False, why not, in words)``."""
        return True, ""

    # ------------------------------------------------------------------ conversion
    def converter_for(self, module: nn.Module) -> Optional[Converter]:
        for klass in type(module).__mro__:
            if klass in self.converters:
                return self.converters[klass]
        return None

    def convert(self, encoder: nn.Module) -> nn.Module:
        """Replace, in place, every module below ``encoder`` by this backend's version; return it.

        Modules the encoder lists in ``modules_outside_hierarchy()`` (classifier heads) are left as
        they are: the hierarchical forward never calls them.
        """
        outside = frozenset(getattr(encoder, "modules_outside_hierarchy", lambda: [])())
        self.convert_children(encoder, prefix="", skip=outside)
        return encoder

    def convert_children(self, parent: nn.Module, prefix: str, skip: frozenset = frozenset()) -> None:
        for child_name, child in list(parent.named_children()):
            qualified = f"{prefix}{child_name}"
            if qualified not in skip:
                setattr(parent, child_name, self.convert_module(child, qualified, skip))

    def convert_module(self, module: nn.Module, qualified: str, skip: frozenset = frozenset()) -> nn.Module:
        """This backend's replacement for ``module`` (a container is converted below and kept)."""
        converter = self.converter_for(module)
        if converter is not None:
            return converter(self, module, qualified)
        if is_container(module):
            self.convert_children(module, prefix=qualified + ".", skip=skip)
            return module
        raise UnsupportedModuleError(
            f"backend {self.name!r} cannot make module {qualified!r} of type "
            f"{type(module).__module__}.{type(module).__qualname__} sparse: it is neither a layer the backend "
            f"knows nor a registered container. If its forward only calls its children and adds their "
            f"outputs, decorate its class with @spark_sparse.register_container; otherwise replace it "
            f"by supported layers."
        )

    def adapt_per_site_module(self, module: nn.Module) -> nn.Module:
        """A module applied to each site's channel vector (e.g. an MLP), adapted to this backend.

        The default keeps it as it is; backends may swap in faster equivalents (same parameters).
        """
        return module

    # ------------------------------------------------------------------ running
    def features_from_image(self, images: torch.Tensor, mask: ActiveMask) -> FeatureMap:
        """The masked image as this backend's representation (stride 1)."""
        return self.feature_type.from_image(images, mask)

    def plan(self, encoder: nn.Module, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> list[tuple[str, str]]:
        """``(layer name, what runs it)`` for every converted layer, for printing and logging."""
        rows = []
        for name, module in encoder.named_modules():
            describe = getattr(module, "describe_execution", None)
            if describe is not None:
                rows.append((name, describe(torch.device(device), dtype)))
        return rows

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
