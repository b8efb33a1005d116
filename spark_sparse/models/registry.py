"""Encoder registry: names -> factories of hierarchical encoders (timm's ``register_model`` shape).

An encoder follows SparK's small contract (see :class:`HierarchicalEncoder`):

- ``get_downsample_ratio() -> int``: the stride of its coarsest feature map (the patch size);
- ``get_feature_map_channels() -> list[int]``: channels of each hierarchical map, finest first;
- ``forward(x, hierarchical=True) -> list``: those maps, finest first, each half the previous size;
- ``timm_state_dict()`` / ``load_timm_state_dict()`` (optional): the weights in the layout a plain
  dense model loads, for export.

Its ``forward`` must only compose child modules and ``+`` so that a backend can swap the modules
(see :func:`spark_sparse.register_container`).

Besides registered names, a *fallback* (:func:`register_model_fallback`) may build encoders for
names it recognises: :mod:`.timm_encoders` serves any timm CNN by its timm name that way.
``list_models(tested_only=True)`` lists the names the test suite checks against ``masked`` on every
backend (features, loss, every gradient) and exports to timm.
"""
from __future__ import annotations

import difflib
import warnings
from typing import Callable, Optional, Protocol, runtime_checkable

import timm
import torch.nn as nn
from timm.layers import DropPath

from ..errors import ConfigError, SparkSparseError
from ..timm_compat import timm_version
from .contract import EncoderContractError, check_encoder, check_factory
from .model_kwargs import format_model_kwargs

__all__ = ["HierarchicalEncoder", "register_model", "register_model_fallback", "create_encoder", "list_models",
           "model_default_drop_path", "UnknownModelError", "ModelNameTakenError", "EncoderContractError", "MODEL_ALIASES",
           "resolve_model_name", "mark_family_unavailable", "unavailable_families"]


@runtime_checkable
class HierarchicalEncoder(Protocol):
    def get_downsample_ratio(self) -> int: ...

    def get_feature_map_channels(self) -> list[int]: ...

    def forward(self, x, hierarchical: bool = True) -> list: ...


class UnknownModelError(SparkSparseError, ValueError):
    pass


class ModelNameTakenError(SparkSparseError, ValueError):
    """A second factory registered under a name another one holds (a user's ``resnet50``, two files' ``my_cnn``)."""


_PACKAGE = __name__.split(".")[0]


_MODELS: dict[str, Callable[..., nn.Module]] = {}
_DEFAULT_DROP_PATH: dict[str, float] = {}
_TESTED: set[str] = set()
#: ``name -> factory or None``: builders of encoders for names not registered (e.g. any timm CNN)
_FALLBACKS: list[Callable[[str], Optional[Callable[..., nn.Module]]]] = []

#: ``family -> (its models, why it could not load)``: families this timm lacks the parts of (see ``models/__init__``)
_UNAVAILABLE_FAMILIES: dict[str, tuple[tuple[str, ...], str]] = {}

#: SparK's older short names (``--model=res50``)
MODEL_ALIASES = {"res50": "resnet50", "res101": "resnet101", "res152": "resnet152", "res200": "resnet200",
                 "cnxS": "convnext_small", "cnxB": "convnext_base", "cnxL": "convnext_large"}


def register_model(name: Optional[str | Callable] = None, default_drop_path: float = 0.0, tested: bool = False):
    """Decorator registering an encoder factory (or class) under ``name`` (default: its ``__name__``).

    Used as ``@register_model("name")``, ``@register_model()`` or bare, ``@register_model``, as timm's
    is (the bare form used to register nothing and replace the factory by the decorator's inner function).
    ``default_drop_path`` is the drop-path rate used when the caller passes ``drop_path_rate=None``;
    ``tested`` declares that the test suite checks this very name on every backend.
    """
    if callable(name):                  # bare @register_model: ``name`` is the factory itself
        return register_model(default_drop_path=default_drop_path, tested=tested)(name, _caller_depth=3)
    def wrap(factory, _caller_depth: int = 2):
        key = name or factory.__name__
        if key in MODEL_ALIASES:
            raise ModelNameTakenError(f"model {key!r} cannot be registered: it is SparK's short name for "
                                      f"{MODEL_ALIASES[key]!r} (--model={key} builds that); register "
                                      f"{_qualified_name(factory)} under another name")
        if key in _MODELS and not _same_factory(_MODELS[key], factory):
            raise ModelNameTakenError(f"model {key!r} is already registered, by {_qualified_name(_MODELS[key])}; "
                                      f"register {_qualified_name(factory)} under another name, e.g. "
                                      f"@register_model('my_{key}')")
        if key not in _MODELS and not _qualified_name(factory).startswith(f"{_PACKAGE}.") and timm.is_model(key):
            warnings.warn(f"model {key!r} registered by {_qualified_name(factory)} shadows timm's {key!r}: --model "
                          f"{key} now builds yours", UserWarning, stacklevel=_caller_depth)
        _MODELS[key] = factory
        _DEFAULT_DROP_PATH[key] = default_drop_path
        if tested:
            _TESTED.add(key)
        return factory
    return wrap


def _qualified_name(factory: Callable) -> str:
    """``module.qualname``: the same after a module is run again (a notebook cell), other for another factory."""
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"


def _same_factory(registered: Callable, factory: Callable) -> bool:
    """The very factory, or the same named function of a module run again; two closures of one maker are not."""
    name = _qualified_name(factory)
    return registered is factory or (name == _qualified_name(registered) and "<locals>" not in name)


def register_model_fallback(resolver: Callable[[str], Optional[Callable[..., nn.Module]]]) -> None:
    """Let ``resolver(name)`` provide a factory (default drop path 0) for names not registered."""
    _FALLBACKS.append(resolver)


def mark_family_unavailable(family: str, models: tuple[str, ...], reason: str) -> None:
    """Record that ``family`` (registering ``models``) could not load with this timm, and why."""
    _UNAVAILABLE_FAMILIES[family] = (models, reason)


def unavailable_families() -> dict[str, tuple[tuple[str, ...], str]]:
    """``family -> (models, reason)`` for the families left out because this timm lacks their parts."""
    return dict(_UNAVAILABLE_FAMILIES)


def list_models(tested_only: bool = False) -> list[str]:
    """Registered model names; with ``tested_only``, those the test suite checks on every backend.

    Names served by a fallback (any timm CNN by its timm name) are not listed.
    """
    return sorted(_TESTED if tested_only else _MODELS)


def _fallback_factory(name: str) -> Optional[Callable[..., nn.Module]]:
    for resolver in _FALLBACKS:
        factory = resolver(name)
        if factory is not None:
            return factory
    return None


def resolve_model_name(name: str) -> str:
    name = MODEL_ALIASES.get(name, name)
    if name in _MODELS:
        return name
    for family, (models, reason) in _UNAVAILABLE_FAMILIES.items():
        if name in models:              # before the fallback: a generic timm CNN would lack the family's converters
            raise UnknownModelError(f"model {name!r} needs a newer timm than this one ({timm_version()}): its family "
                                    f"({family}) could not be loaded ({reason}); upgrade timm (pip install -U timm)")
    if _fallback_factory(name) is None:
        close = difflib.get_close_matches(name, [*list_models(), *MODEL_ALIASES], n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        left_out = (f"; with this timm ({timm_version()}) these families are left out, a newer one has them: "
                    f"{', '.join(_UNAVAILABLE_FAMILIES)}" if _UNAVAILABLE_FAMILIES else "")
        raise UnknownModelError(f"unknown model {name!r}; {hint}known models: {', '.join(list_models())} "
                                f"(aliases: {', '.join(f'{a}={n}' for a, n in MODEL_ALIASES.items())}), or any timm "
                                f"CNN by its timm name (timm.list_models()){left_out}")
    return name


def model_default_drop_path(name: str) -> float:
    return _DEFAULT_DROP_PATH.get(resolve_model_name(name), 0.0)


def create_encoder(name: str, /, drop_path_rate: Optional[float] = None, **kwargs) -> nn.Module:
    """Build an encoder with its default drop-path rate (SparK's for registered models) unless one is given;
    ``kwargs`` go to its factory (``name`` is positional-only, so a constructor may take a ``name`` of its own)."""
    key = resolve_model_name(name)
    rate = model_default_drop_path(key) if drop_path_rate is None else drop_path_rate
    factory = _MODELS.get(key) or _fallback_factory(key)
    check_factory(factory, key)
    try:
        encoder = factory(drop_path_rate=rate, **kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        if isinstance(err, TypeError) and "'drop_path_rate'" in str(err):   # a factory's **kwargs passed it on
            raise EncoderContractError(f"model {key!r}: building it with drop_path_rate={rate} failed ({err}): the "
                                       f"factory must take drop_path_rate (SparK's stochastic depth) and may ignore "
                                       f"it, but not pass it to a constructor that does not take it") from err
        if not kwargs or isinstance(err, SparkSparseError):
            raise
        # with constructor arguments given, a constructor's own complaint is most likely about them
        raise ConfigError(f"model {key!r} could not be built with {format_model_kwargs(kwargs)} "
                          f"({type(err).__name__}: {err}); check their names and values against the model's "
                          f"constructor") from err
    # a user's encoder is probed once (this package's families are checked by its tests)
    users = not getattr(factory, "__module__", "").startswith(f"{_PACKAGE}.")
    check_encoder(encoder, key, probe=users)
    if users and rate and not any(isinstance(module, DropPath) for module in encoder.modules()):
        warnings.warn(f"model {key!r} was asked for drop path {rate:g} (--dp) but holds no DropPath layer: its "
                      f"factory may ignore drop_path_rate, and then the run has no stochastic depth; build "
                      f"timm.layers.DropPath(drop_path_rate) into its blocks, or pre-train it with --dp 0",
                      UserWarning, stacklevel=2)
    return encoder
