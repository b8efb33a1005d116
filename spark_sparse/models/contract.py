"""The encoder contract, checked when a user's encoder is created rather than deep inside the first step.

A custom encoder that declares other channels than its maps have, returns its maps coarsest first,
states a wrong downsample ratio or has a factory without ``drop_path_rate`` would otherwise fail far
from the cause: a 100-line traceback ending in PyTorch's "running_mean should contain 64 elements
not 128" from the densify norms, or a decoder shape mismatch. :func:`check_encoder` names the broken
promise instead, from the declared values and one dense forward of a small image (the probe).

The probe runs only for encoders from outside this package (the package's own families are checked by
its tests), once per creation, in eval mode without gradients, and leaves the encoder as it was.
A probe forward that raises tells nothing about the contract (a net may need larger images): its
error is left for the run to report where it happens.
"""
from __future__ import annotations

import inspect
import math
import operator
from typing import Callable

import torch
import torch.nn as nn

from ..errors import SparkSparseError

__all__ = ["EncoderContractError", "check_factory", "check_encoder"]


class EncoderContractError(SparkSparseError, TypeError):
    """An encoder (or its factory) that does not follow SparK's contract; the message says which promise."""


def check_factory(factory: Callable[..., nn.Module], name: str) -> None:
    """Refuse a factory that cannot take ``drop_path_rate`` (the CLI's ``--dp`` reaches every encoder by it)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):      # a builtin or C callable: nothing to read, let the call tell
        return
    try:
        signature.bind_partial(drop_path_rate=0.0)
    except TypeError:
        raise EncoderContractError(
            f"model {name!r}: its factory {getattr(factory, '__qualname__', factory)}{signature} does not accept "
            f"drop_path_rate; give it a drop_path_rate=0.0 parameter (or **kwargs), which --dp sets") from None


def _check_has_methods(encoder: nn.Module, name: str) -> None:
    missing = [method for method in ("get_downsample_ratio", "get_feature_map_channels", "forward")
               if not callable(getattr(encoder, method, None))]
    if missing:
        raise EncoderContractError(f"model {name!r} does not follow the encoder contract (get_downsample_ratio, "
                                   f"get_feature_map_channels, forward(x, hierarchical=True)): its "
                                   f"{type(encoder).__name__} has no {' and no '.join(missing)} method")


def _declared(encoder: nn.Module, name: str) -> tuple[int, list[int]]:
    declared = encoder.get_downsample_ratio()
    try:
        ratio = operator.index(declared)
    except TypeError:
        ratio = 0
    if isinstance(declared, bool) or ratio < 2 or 2 ** round(math.log2(ratio)) != ratio:
        raise EncoderContractError(f"model {name!r}: get_downsample_ratio() must return the stride of its coarsest "
                                   f"map, a power of two (SparK's nets: 32), got {declared!r}")
    channels = list(encoder.get_feature_map_channels())
    if not channels or any(isinstance(c, bool) or not isinstance(c, int) or c <= 0 for c in channels):
        raise EncoderContractError(f"model {name!r}: get_feature_map_channels() must list each map's channels as "
                                   f"positive ints, finest first, got {channels!r}")
    if len(channels) > round(math.log2(ratio)):
        raise EncoderContractError(
            f"model {name!r}: {len(channels)} feature maps, but a downsample ratio of {ratio} leaves room for "
            f"{round(math.log2(ratio))} (strides {', '.join(str(ratio >> i) for i in reversed(range(round(math.log2(ratio)))))}"
            f"; the decoder takes one map per stride)")
    return ratio, channels


def _check_takes_hierarchical(encoder: nn.Module, name: str) -> None:
    """SparK calls ``forward(x, hierarchical=True)``: a forward without that keyword is named now, not met as a
    TypeError in the middle of the run's setup (the probe below swallows its forward's failures)."""
    try:
        parameters = inspect.signature(encoder.forward).parameters.values()
    except (TypeError, ValueError):          # no signature to read (a builtin): left to the run
        return
    if not any(p.name == "hierarchical" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        raise EncoderContractError(f"model {name!r}: its forward must take a keyword argument 'hierarchical' (SparK "
                                   f"calls forward(x, hierarchical=True) and uses the list of feature maps it returns, "
                                   f"finest first): def forward(self, x, hierarchical=False)")


def _probe(encoder: nn.Module, ratio: int) -> object:
    """The encoder's hierarchical output for one ``2 ratio x 2 ratio`` image, or ``None`` if its forward fails."""
    side = 2 * ratio
    parameter = next(encoder.parameters(), None)
    image = torch.zeros(1, 3, side, side, dtype=parameter.dtype if parameter is not None else torch.float32,
                        device=parameter.device if parameter is not None else None)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            return encoder(image, hierarchical=True)
    except Exception:       # not the contract's business: the run reports it where it happens
        return None
    finally:
        encoder.train(was_training)


def check_encoder(encoder: nn.Module, name: str, probe: bool = True) -> None:
    """Raise :class:`EncoderContractError` where ``encoder`` breaks the contract of
    :mod:`~spark_sparse.models.registry`: its declared ratio and channels, then (``probe``) its maps for a
    ``2 ratio``-pixel image: a list, one map per declared channel count, finest first, each twice the size of
    the next, the last at ``1 / ratio``."""
    _check_has_methods(encoder, name)
    ratio, channels = _declared(encoder, name)
    _check_takes_hierarchical(encoder, name)
    if not probe:
        return
    maps = _probe(encoder, ratio)
    if maps is None:
        return
    side = 2 * ratio
    if not isinstance(maps, (list, tuple)) or not all(isinstance(m, torch.Tensor) and m.dim() == 4 for m in maps):
        raise EncoderContractError(f"model {name!r}: forward(x, hierarchical=True) must return a list of [B, C, H, W] "
                                   f"feature maps, finest first; got {type(maps).__name__}")
    shapes = [tuple(m.shape[1:]) for m in maps]
    expected = [(c, side * 2 ** (len(channels) - 1 - i) // ratio, side * 2 ** (len(channels) - 1 - i) // ratio)
                for i, c in enumerate(channels)]
    if shapes != expected:
        def listed(items: list[tuple[int, int, int]]) -> str:
            return ", ".join(f"{c}x{h}x{w}" for c, h, w in items)
        raise EncoderContractError(
            f"model {name!r}: for a {side}x{side} image its forward returned maps (C x H x W) {listed(shapes)}, but "
            f"its get_feature_map_channels() {channels} and get_downsample_ratio() {ratio} promise {listed(expected)} "
            f"(finest first, each twice the size of the next, the last at 1/{ratio} of the image)")
