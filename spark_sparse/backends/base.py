"""The backend interface and the module-conversion walk every backend shares.

A backend converts a dense encoder module tree in place: each leaf module with its own compute is
replaced by a module that consumes and returns :class:`~spark_sparse.features.FeatureMap` objects
(the replacement keeps the original parameter names, so state dicts stay timm's). Composite modules
(``nn.Sequential``, timm's ``Bottleneck``, ...) whose ``forward`` only calls their children, adds
results and concatenates, splits or slices channels (``torch.cat`` / ``split`` / ``chunk`` / ``x[:, a:b]``
along ``dim=1``) are kept as they are and recursed into. A module type that is neither known to the
backend nor a known container is an error naming the module, never silently dense.

Conversion is exact or refuses: a converter applies to exactly the module types it was registered
for. A subclass (timm's ``BatchNormAct2d`` is a ``BatchNorm2d`` plus an activation, ``StdConv2d`` a
``Conv2d`` with standardised weights) has its own maths and is converted only by a converter
registered for it, never as its base class.

Layers that run the same way on every backend (written against :class:`FeatureMap`, e.g. a model
family's blocks) register once with :func:`register_converter`; a backend's own table (its
convolutions and pools) takes precedence.
"""
from __future__ import annotations

from typing import Callable, ClassVar, Optional

import torch
import torch.nn as nn

from ..errors import SparkSparseError
from ..features import FeatureMap, MaskedDense
from ..mask import ActiveMask

__all__ = ["Backend", "UnsupportedModuleError", "UnsupportedLayerSettingError", "register_container",
           "register_converter", "register_same_maths", "is_container", "Converter"]

#: ``(backend, module, qualified name) -> replacement module``
Converter = Callable[["Backend", nn.Module, str], nn.Module]

_CONTAINERS: set[type] = {nn.Sequential, nn.ModuleList, nn.ModuleDict}
_SHARED_CONVERTERS: dict[type, Converter] = {}
#: modules whose forwards pass maps in a known layout: this package's converters (tested against timm's dense
#: layers), timm's blocks and torch's containers (which pass on what their caller gives)
_AUDITED_FORWARDS = (f"{__name__.split('.')[0]}.", "timm.", "torch.")


class UnsupportedModuleError(SparkSparseError, TypeError):
    pass


#: set by :meth:`Backend.convert` on the encoder it converts in place: the backend's name
_CONVERTED_FOR = "_spark_sparse_converted_for"


def refuse_converted(encoder: nn.Module) -> None:
    """An encoder a backend has converted (its layers replaced in place) cannot be converted again: its layers
    are no longer the dense ones (a converted conv would be met as an unknown subclass of Conv2d)."""
    backend = getattr(encoder, _CONVERTED_FOR, None)
    if backend is not None:
        raise UnsupportedModuleError(
            f"this {type(encoder).__name__} was converted for backend {backend!r} already (a SparK model replaces "
            f"its encoder's layers in place, and a conversion that failed may have replaced some): build a new "
            f"instance for each SparK model, or pass copy.deepcopy of the dense one")


class UnsupportedLayerSettingError(UnsupportedModuleError, NotImplementedError):
    """A layer the backend knows, with a setting its converter cannot reproduce (e.g. ``padding_mode='reflect'``):
    still a ``NotImplementedError`` for callers that catch the converters' own."""


def _active_dropout(encoder: nn.Module, outside: frozenset) -> Optional[tuple[str, nn.Module]]:
    """The first dropout layer with ``p > 0`` in the hierarchy (outside it: a classifier's, never run)."""
    for name, module in encoder.named_modules():
        if (isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0
                and not any(name == skip or name.startswith(f"{skip}.") for skip in outside)):
            return name, module
    return None


def register_converter(*module_types: type) -> Callable[[Converter], Converter]:
    """Decorator: ``converter(backend, module, name)`` converts modules of exactly ``module_types``.

    For layers written against :class:`FeatureMap` that every backend runs alike (a model family's
    blocks, norms, attention): the converter returns a module whose forward takes and returns a feature
    map, keeping the layer's parameters under their names. Subclasses of ``module_types`` are not
    covered: list them explicitly, or declare one with the maths of its base with
    :func:`register_same_maths`. A type the backends convert themselves (``nn.Conv2d``, ``nn.ReLU``, ...)
    is refused: its registered converter would never run.
    """
    if not module_types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in module_types):
        given = ", ".join(getattr(t, "__qualname__", repr(t)) for t in module_types) or "nothing"
        raise TypeError(f"register_converter takes the module classes it converts, as in "
                        f"@register_converter(MyLayer) above def convert(backend, module, name), got: {given}")
    for module_type in module_types:
        converting, every = _backends_converting(module_type)
        if converting and converting == every:
            raise ValueError(f"{module_type.__qualname__} is converted by the backends themselves "
                             f"({', '.join(converting)}): a registered converter would never run. Subclass it and "
                             f"register the subclass, or declare a subclass with its maths by register_same_maths")

    def wrap(converter: Converter, *misused, **misused_keywords) -> Converter:
        itself = isinstance(converter, type) and issubclass(converter, module_types)
        if misused or misused_keywords or not callable(converter) or itself:
            what = converter.__qualname__ if itself else type(converter).__name__
            raise TypeError(f"register_converter({', '.join(t.__qualname__ for t in module_types)}) decorates a "
                            f"converter, a function or class called as (backend, module, name) that returns the "
                            f"converted module; it was given {what}"
                            f"{' and more arguments' if misused or misused_keywords else ''} (used bare on a layer "
                            f"class, that class became this decorator; for a subclass with its base's maths use "
                            f"register_same_maths)")
        for module_type in module_types:
            if module_type in _SHARED_CONVERTERS and _SHARED_CONVERTERS[module_type] is not converter:
                raise ValueError(f"a converter for {module_type.__qualname__} is already registered")
            _SHARED_CONVERTERS[module_type] = converter
        return converter
    return wrap


#: activations that do not map 0 to 0, with their value there (a user's block calling one is told why it is refused)
_NOT_ZERO_AT_ZERO = {nn.Sigmoid: "sigmoid(0) = 0.5", nn.Hardsigmoid: "hardsigmoid(0) = 0.5",
                     nn.Softplus: "softplus(0) = log 2", nn.LogSigmoid: "logsigmoid(0) = -log 2",
                     nn.Softmax: "a softmax over zeros is 1/n, not 0", nn.Softmax2d: "a softmax over zeros is 1/n, not 0"}

#: pools to a fixed output size: over SparK's map they would average (or take the max with) its masked zeros
_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_GATE_HINT = (" A squeeze-excitation or attention gate written by hand (a global pool, a sigmoid): build it from "
              "timm's SEModule, EffectiveSEModule or EcaModule (timm.layers), which every backend converts, "
              "their statistics taken over each image's active sites.")

#: subclasses declared to compute exactly what a base computes: converted as that base
_SAME_MATHS: dict[type, type] = {}


def register_same_maths(subclass: type, base: type) -> type:
    """Declare that ``subclass`` computes exactly what ``base`` computes, so every backend converts it as ``base``.

    A subclass is never converted as its base on trust (it may override ``forward``); a user's
    ``class MyConv(nn.Conv2d)`` that only adds helpers or a name is declared here, once. Returns
    ``subclass``, so ``register_same_maths(MyConv, nn.Conv2d)`` can follow its definition."""
    if not (isinstance(subclass, type) and isinstance(base, type) and issubclass(subclass, base)
            and issubclass(base, nn.Module) and subclass is not base):
        raise TypeError(f"register_same_maths(subclass, base) takes a module class and one of its bases, got "
                        f"{subclass!r} and {base!r}")
    if "forward" in vars(subclass):
        raise ValueError(f"{subclass.__qualname__} defines its own forward: its maths is not declared to be "
                         f"{base.__qualname__}'s. Write a converter for it (register_converter)")
    _SAME_MATHS[subclass] = base
    return subclass


def _backends_converting(module_type: type) -> tuple[list[str], list[str]]:
    """The registered backends whose own converters take ``module_type``, and every registered backend: a shared
    converter runs on the backends that do not (a user's backend may convert a layer of theirs itself)."""
    from .registry import _BACKENDS           # the backends register after this module is imported
    return [name for name, backend in _BACKENDS.items() if module_type in backend.converters], list(_BACKENDS)


def register_container(cls: type) -> type:
    """Declare that ``cls.forward`` only composes its children, ``+`` and channel cat / split / slices.

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
    #: module type -> converter, by exact type (then :func:`register_converter`'s shared table)
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
        """The converter registered for exactly ``type(module)`` (never one of its base classes)."""
        kind = type(module)
        return self.converters.get(kind) or _SHARED_CONVERTERS.get(kind)

    def _known_base(self, module: nn.Module) -> Optional[type]:
        """The nearest base class of ``module`` that has a converter (for the error message)."""
        for klass in type(module).__mro__[1:]:
            if klass in self.converters or klass in _SHARED_CONVERTERS:
                return klass
        return None

    def convert(self, encoder: nn.Module) -> nn.Module:
        """Replace, in place, every module below ``encoder`` by this backend's version; return it.

        Modules the encoder lists in ``modules_outside_hierarchy()`` (classifier heads) are left as
        they are: the hierarchical forward never calls them.
        """
        refuse_converted(encoder)
        setattr(encoder, _CONVERTED_FOR, self.name)      # before converting: a conversion that fails half-way too
        outside = frozenset(getattr(encoder, "modules_outside_hierarchy", lambda: [])())
        dropout = None if issubclass(self.feature_type, MaskedDense) else _active_dropout(encoder, outside)
        self.convert_children(encoder, prefix="", skip=outside)      # a layer it cannot convert is said first
        if dropout is not None:
            # one random value per element: over the dense map on masked, over the active rows here, so the
            # same seed would drop other values; refused, not approximated
            name, module = dropout
            raise UnsupportedModuleError(
                f"backend {self.name!r} cannot run {name!r} ({type(module).__name__}, p={module.p:g}): dropout draws "
                f"its random values over the dense map on 'masked' and over the active rows here, so their results "
                f"would differ. Build the model without dropout (SparK pre-trains without it; e.g. leave timm's "
                f"proj_drop_rate at 0), or use --backend masked")
        return encoder

    def convert_children(self, parent: nn.Module, prefix: str, skip: frozenset = frozenset(),
                         users_layout: bool = False) -> None:
        """Convert ``parent``'s children in place. Under a forward of the user's own (``users_layout``, or
        ``parent``'s class from outside this package, timm and torch) layers over the last dimension take
        channels-last views only (:class:`~spark_sparse.backends.common.LastDimensionLayer`)."""
        users_layout = users_layout or not type(parent).__module__.startswith(_AUDITED_FORWARDS)
        for child_name, child in list(parent.named_children()):
            qualified = f"{prefix}{child_name}"
            if qualified not in skip:
                setattr(parent, child_name, self.convert_module(child, qualified, skip, users_layout))

    def convert_module(self, module: nn.Module, qualified: str, skip: frozenset = frozenset(),
                       users_layout: bool = False) -> nn.Module:
        """This backend's replacement for ``module`` (a container is converted below and kept)."""
        if type(module) in _SAME_MATHS:        # declared to be its base: converted as one (the conversion is in
            module.__class__ = _SAME_MATHS[type(module)]        # place anyway, and the weights keep their names)
        converter = self.converter_for(module)
        if converter is not None:
            try:
                converted = converter(self, module, qualified)
            except NotImplementedError as err:    # the converter's reason, as one line with the way out
                raise UnsupportedLayerSettingError(
                    f"{err} (backend {self.name!r}, module of type {type(module).__name__}): build the layer "
                    f"otherwise, or use --backend masked, which runs every layer as SparK does") from None
            if users_layout and hasattr(converted, "refuses_channels_first_maps"):
                converted.refuses_channels_first_maps = True
            return converted
        if is_container(module):
            self.convert_children(module, prefix=qualified + ".", skip=skip, users_layout=users_layout)
            return module
        kind = f"{type(module).__module__}.{type(module).__qualname__}"
        base = self._known_base(module)
        if base is not None:
            raise UnsupportedModuleError(
                f"backend {self.name!r} cannot convert module {qualified!r} of type {kind}: it subclasses "
                f"{base.__module__}.{base.__qualname__}, which the backend knows, but a subclass may compute "
                f"something else, so it is not converted as its base. If its maths is exactly its base's, "
                f"declare it: spark_sparse.register_same_maths({type(module).__qualname__}, {base.__qualname__}); "
                f"otherwise write a converter for it (@spark_sparse.register_converter).")
        if type(module) in _NOT_ZERO_AT_ZERO:
            raise UnsupportedModuleError(
                f"backend {self.name!r} cannot convert module {qualified!r} of type {kind}: "
                f"{_NOT_ZERO_AT_ZERO[type(module)]}, so on the dense map it would fill the masked sites, which SparK "
                f"keeps at 0: it has no exact meaning on active sites alone. Inside a gate (squeeze-excitation, "
                f"attention), convert the block that uses it (@spark_sparse.register_converter, FeatureMap.per_site)."
                f"{_GATE_HINT}")
        if isinstance(module, _GLOBAL_POOLS):
            raise UnsupportedModuleError(
                f"backend {self.name!r} cannot convert module {qualified!r} of type {kind}: a pool to a fixed size "
                f"over SparK's masked map would take its masked zeros in, so it has no exact meaning on active "
                f"sites alone.{_GATE_HINT}")
        gate_like = any(isinstance(m, (*_NOT_ZERO_AT_ZERO, *_GLOBAL_POOLS)) for m in module.modules())
        raise UnsupportedModuleError(
            f"backend {self.name!r} cannot convert module {qualified!r} of type {kind}: it is neither a "
            f"layer the backend knows nor a registered container. For a timm model: its family is not "
            f"supported (README lists those that are), or the model's arguments added this layer to a family "
            f"that is (e.g. drop_block_rate: build it without them). For your own module: if its forward only "
            f"calls its children, adds their outputs and concatenates, splits or slices channels (dim=1), "
            f"decorate its class with @spark_sparse.register_container; otherwise replace it by supported layers "
            f"or register a converter (@spark_sparse.register_converter).{_GATE_HINT if gate_like else ''}"
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
