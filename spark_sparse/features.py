"""What flows through a backend-converted encoder: feature values plus the active mask.

A converted encoder keeps the user's (or timm's) own ``forward`` code; only its modules change.
The value passed between modules is a feature map object that knows its mask, so modules never
consult global state. Two representations exist:

- :class:`MaskedDense`: SparK's reference, a dense ``(B, C, H, W)`` tensor that is zero at masked
  sites (the ``masked`` backend);
- :class:`SparseRows`: the true sparse form, a ``[N, C]`` matrix whose rows are the active sites of
  ``mask.coords_at(stride)`` (the sparse backends).

Both support ``+`` and ``-`` of maps of the same sites (residual adds; also of the number 0, which sums
start from), products and quotients by a scalar, :meth:`per_site` (any function of each site's channel vector: activations, Linear layers, layer-scale) and the
channel bookkeeping of concatenating nets (``torch.cat`` / ``torch.split`` / ``torch.chunk`` /
``.split`` / ``.chunk`` along ``dim=1``, channel slices ``x[:, a:b]``: CSPNet, DenseNet, VoVNet,
Res2Net, GhostNet), so a block written once runs on every backend. Channels are dimension 1
of both layouts (``[B, C, H, W]`` and ``[N, C]``), and every part of a split, like every input of a
concatenation, has the same active sites, so these are exact on both. Channels-last blocks
(MambaOut) permute a map to NHWC and back: :class:`ChannelsLastView` is the same map with the last
dimension as its channels.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from .errors import SparkSparseError
from .mask import ActiveMask

__all__ = ["FeatureMap", "MaskedDense", "SparseRows", "ChannelsLastView", "FeatureMapMismatch",
           "UnsupportedFeatureOperation", "UnsupportedFeatureMethod", "sample_drop_path_keep"]


class UnsupportedFeatureOperation(SparkSparseError, TypeError):
    """A model's forward asked a feature map for an operation without an exact meaning on active sites
    (a torch function other than channel cat/split/chunk, or one of those along another dimension)."""


class UnsupportedFeatureMethod(UnsupportedFeatureOperation, AttributeError):
    """A model's forward called a ``torch.Tensor`` method a feature map does not define (``x.clone()``,
    ``x.view(...)``). Also an ``AttributeError``, so ``hasattr`` still answers False."""


class FeatureMapMismatch(SparkSparseError, ValueError):
    """Two feature maps combined (added, concatenated, multiplied) that do not hold the same sites: another
    stride, mask or representation. The dense model would fail on their shapes too."""


#: what a block's forward may do with feature maps, and the ways out (every refusal ends with it)
_ALLOWED_IN_A_BLOCK = ("a block's forward may call its children, add or subtract maps, scale them by a number, and "
                       "cat/split/chunk along channels; write a "
                       "converter for a module that needs more (@spark_sparse.register_converter), or build the "
                       "model without the option that calls it")


#: the channel dimension in the NCHW spelling a model's own code uses (``dim=1`` or ``dim=-3``), and in the
#: NHWC spelling of channels-last blocks (``dim=-1`` or ``dim=3``)
_CHANNEL_DIMS, _CHANNELS_LAST_DIMS = (1, -3), (-1, 3)


def _operand_refused(operation: str, other: object, map_first: bool = True) -> UnsupportedFeatureOperation:
    """The error for ``map <operation> other`` where ``other`` is not a feature map: a number or a tensor would
    reach the masked sites too, which SparK keeps at zero, so such a term has no exact meaning on active sites."""
    if isinstance(other, torch.Tensor):
        kind = f"a tensor of shape {tuple(other.shape)}"
    elif _is_number(other):
        kind = f"the number {other!r}"
    else:
        kind = f"a {type(other).__name__}"
    if operation == "divide":
        return UnsupportedFeatureOperation(
            f"a SparK feature map can be divided by one scalar (a number or a one-element tensor) only, not by {kind}")
    if map_first:
        what = f"{operation} {kind} {'from' if operation == 'subtract' else 'to'} a SparK feature map"
    else:
        what = f"subtract a SparK feature map from {kind}"
    return UnsupportedFeatureOperation(
        f"cannot {what}: it would make the masked sites non-zero, "
        f"which SparK keeps at 0 (only 0 itself, or a feature map of the same sites, can be added); add it inside "
        f"a layer, e.g. as a conv's or a norm's bias, which every backend applies at active sites only")


def _channel_dim(dim: int, operation: str, channels_last: bool = False) -> int:
    """1, the channel dimension of both layouts, for ``dim`` naming channels in the model's spelling (NCHW,
    or NHWC on a channels-last view), or an error: other dimensions mix sites or images."""
    if dim not in (_CHANNELS_LAST_DIMS if channels_last else _CHANNEL_DIMS):
        of = "a channels-last view of SparK feature maps" if channels_last else "SparK feature maps"
        raise UnsupportedFeatureOperation(
            f"{operation} of {of} works along channels only (dim={-1 if channels_last else 1}), got dim={dim}: "
            f"other dimensions would mix images or sites, which have no meaning on active sites")
    return 1


def sample_drop_path_keep(batch_size: int, drop_prob: float, scale_by_keep: bool,
                          like: torch.Tensor) -> torch.Tensor:
    """Per-image DropPath factors ``[B]`` (0 or 1/keep), drawn exactly as timm's ``drop_path`` does.

    Both representations draw their factors here, so the same seed drops the same images on every
    backend.
    """
    keep = 1.0 - drop_prob
    factors = like.new_empty((batch_size, 1, 1, 1)).bernoulli_(keep)
    if keep > 0.0 and scale_by_keep:
        factors.div_(keep)
    return factors.view(batch_size)


def _is_number(value: object) -> bool:
    """A Python int or float (not a bool, not a tensor)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_zero_scalar(value: object) -> bool:
    """The Python number 0: the one scalar that adds nothing at any site."""
    return _is_number(value) and value == 0


def _is_scalar(value: object) -> bool:
    """A Python number or a one-element tensor (NF-Net's gains): a factor that keeps every zero a zero."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and value.dim() <= 1
    return _is_number(value)


def _is_whole_slice(value: object) -> bool:
    return isinstance(value, slice) and value == slice(None)


#: ``permute`` orders between the NCHW spelling and the NHWC one of channels-last blocks
_TO_CHANNELS_LAST, _TO_CHANNELS_FIRST = (0, 2, 3, 1), (0, 3, 1, 2)


def _permutation(dims: tuple) -> tuple:
    """``permute``'s arguments as one tuple: ``x.permute(0, 2, 3, 1)`` and ``x.permute((0, 2, 3, 1))``."""
    order = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else tuple(dims)
    return tuple(d % 4 if isinstance(d, int) and -4 <= d < 4 else d for d in order)


#: zero-preserving functions a block may call on a map as a child module instead (the backends convert modules)
_AS_MODULES = {"relu": "nn.ReLU", "relu_": "nn.ReLU", "relu6": "nn.ReLU6", "gelu": "nn.GELU", "silu": "nn.SiLU",
               "leaky_relu": "nn.LeakyReLU", "hardswish": "nn.Hardswish", "mish": "nn.Mish", "tanh": "nn.Tanh",
               "elu": "nn.ELU", "celu": "nn.CELU", "selu": "nn.SELU", "dropout": "nn.Dropout"}

#: torch functions that feature maps (and their channels-last views) answer with their own method
_FUNCTIONS_AS_METHODS = {torch.split: "split", torch.Tensor.split: "split", torch.chunk: "chunk",
                         torch.Tensor.chunk: "chunk", torch.permute: "permute", torch.Tensor.permute: "permute"}


def _dispatch_torch_function(func, args: tuple, kwargs: Optional[dict], concat: Callable, what: str):
    """``__torch_function__`` of feature maps and views: ``torch.cat`` / ``torch.concat`` by ``concat(maps,
    dim)``, split / chunk / permute by the first argument's method; any other function refused."""
    kwargs = dict(kwargs or {})
    if func in (torch.cat, torch.concat):
        maps = args[0] if args else kwargs.pop("tensors")
        dim = args[1] if len(args) > 1 else kwargs.pop("dim", 0)       # torch's default, 0: an error there
        return concat(maps, dim)
    if func in _FUNCTIONS_AS_METHODS:
        return getattr(args[0], _FUNCTIONS_AS_METHODS[func])(*args[1:], **kwargs)
    name = getattr(func, "__name__", repr(func))
    as_module = (f"; in a block of your own, call it as a child module ({_AS_MODULES[name]}() in __init__, then "
                 f"self.act(x)), which every backend converts" if name in _AS_MODULES else "")
    raise UnsupportedFeatureOperation(f"{_spelled_as_called(func)} is not defined on {what}{as_module}: "
                                      f"{_ALLOWED_IN_A_BLOCK}")


def _spelled_as_called(func) -> str:
    """``func`` as a model's code spells it: ``F.interpolate`` (``torch.nn.functional``, also its C parts),
    ``Tensor.mean`` (methods), ``torch.sigmoid`` (the rest), so the user finds the call in their forward."""
    name = getattr(func, "__name__", repr(func))
    module = getattr(func, "__module__", None) or ""
    if module.startswith(("torch.nn.functional", "torch._C._nn")):
        return f"F.{name}"
    if not module and getattr(func, "__qualname__", "").startswith(("TensorBase.", "Tensor.")):
        return f"Tensor.{name}"
    return f"torch.{name}"


class FeatureMap:
    """Common interface of the two representations."""

    mask: ActiveMask
    stride: int
    data: torch.Tensor

    @property
    def channels(self) -> int:
        raise NotImplementedError

    def with_data(self, data: torch.Tensor) -> "FeatureMap":
        return type(self)(data, self.mask, self.stride)

    def per_site(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "FeatureMap":
        """Apply ``fn`` to each site's channel vector (``fn`` maps ``[..., C]`` to ``[..., C']``)."""
        raise NotImplementedError

    def elementwise(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "FeatureMap":
        """Apply a zero-preserving elementwise function (ReLU, GELU, ...)."""
        return self.with_data(fn(self.data))

    def drop_path(self, drop_prob: float, training: bool, scale_by_keep: bool = True) -> "FeatureMap":
        raise NotImplementedError

    def active_rows(self) -> torch.Tensor:
        """``[N, C]``: the features of the active sites, in ``mask.coords_at(stride)`` order."""
        raise NotImplementedError

    def with_active_rows(self, rows: torch.Tensor) -> "FeatureMap":
        """A feature map of the same sites holding ``rows`` ``[N, C']`` (zero at masked sites)."""
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """``(B, C, H, W)`` with exact zeros at masked sites."""
        raise NotImplementedError

    def _check_same_sites(self, other: "FeatureMap", operation: str = "add") -> None:
        if not isinstance(other, FeatureMap):
            raise _operand_refused(operation, other)
        if not isinstance(other, type(self)) or other.mask is not self.mask or other.stride != self.stride:
            raise FeatureMapMismatch(
                f"cannot {operation} feature maps of different kinds, masks or strides "
                f"({type(self).__name__} stride {self.stride}, {type(other).__name__} stride {other.stride})")

    def __add__(self, other: Union["FeatureMap", int, float]) -> "FeatureMap":
        if _is_zero_scalar(other):      # sums started from 0 (MobileOne's branches): exact, sites unchanged
            return self
        self._check_same_sites(other)
        return self.with_data(self.data + other.data)

    __iadd__ = __radd__ = __add__

    def __sub__(self, other: "FeatureMap") -> "FeatureMap":
        """The difference of two maps of the same sites (PoolFormer's ``pool(x) - x``)."""
        if _is_zero_scalar(other):
            return self
        self._check_same_sites(other, "subtract")
        return self.with_data(self.data - other.data)

    __isub__ = __sub__

    def __rsub__(self, other: Union[int, float]) -> "FeatureMap":
        """``0 - x`` is ``-x``; any other ``number - x`` is refused as ``x + number`` is."""
        if _is_zero_scalar(other):
            return -self
        raise _operand_refused("subtract", other, map_first=False)

    def __neg__(self) -> "FeatureMap":
        """``-x``: zeros stay zeros, the sites are unchanged."""
        return self.with_data(-self.data)

    def __truediv__(self, divisor: Union[torch.Tensor, int, float]) -> "FeatureMap":
        """The features divided by one scalar (``x / self.scale``): masked sites stay 0. Other divisors are
        refused, as other factors are in ``*``; a zero divisor gives inf/nan at active sites as in the dense
        model."""
        if not _is_scalar(divisor):
            raise _operand_refused("divide", divisor)
        return self.with_data(self.data / divisor)

    def __mul__(self, factor: Union["FeatureMap", torch.Tensor, int, float]) -> "FeatureMap":
        """The features times one scalar (NF-Nets' ``x * beta``, ``attn_gain * x``), times a factor
        per channel written in NCHW, shape ``(1, C, 1, 1)`` or ``(C, 1, 1)`` (InceptionNeXt's layer
        scale ``x.mul(gamma.reshape(1, -1, 1, 1))``), or times another map of the same sites and
        channels, site by site (StarNet's "star" ``act(x1) * x2``), or of one channel, broadcast over
        the other's channels as in NCHW (FocalNet's gates ``ctx * gates[:, l:l + 1]``): masked sites
        stay 0.

        Any other shape would mean positions or images, which active sites do not have: refused."""
        if isinstance(factor, FeatureMap):
            self._check_same_sites(factor, "multiply")
            if factor.channels != self.channels and 1 not in (factor.channels, self.channels):
                raise UnsupportedFeatureOperation(
                    f"two SparK feature maps multiply site by site only with the same channels or one channel "
                    f"in either, not {self.channels} and {factor.channels}")
            return self.with_data(self.data * factor.data)
        if _is_scalar(factor):
            return self.with_data(self.data * factor)
        if isinstance(factor, torch.Tensor) and factor.shape in ((1, self.channels, 1, 1), (self.channels, 1, 1)):
            per_channel = factor.reshape(self.channels)
            return self.per_site(lambda values: values * per_channel)
        kind = f"a tensor of shape {tuple(factor.shape)}" if isinstance(factor, torch.Tensor) else type(factor).__name__
        raise UnsupportedFeatureOperation(
            f"a SparK feature map can be multiplied by one scalar (a number or a one-element tensor), by a "
            f"per-channel factor of shape (1, {self.channels}, 1, 1) or by a map of the same sites only, "
            f"not by {kind}")

    __rmul__ = mul = __mul__

    def mul_(self, factor: Union[torch.Tensor, int, float]) -> "FeatureMap":
        """``x.mul_(gain)`` (NF-Net's skip-init gain): this map holds the product afterwards.

        The product is a new tensor (autograd may keep the old one for backward); only the map's
        reference to its data changes, which is what the caller's later reads of ``x`` see."""
        vars(self).update(vars(self * factor))
        return self

    # ------------------------------------------------------------------ channel bookkeeping
    def split(self, split_size_or_sections: Union[int, Sequence[int]], dim: int = 0) -> tuple["FeatureMap", ...]:
        """Channel groups of the same sites, as ``Tensor.split`` (CSPNet's and Res2Net's blocks).

        ``dim`` defaults to 0 as in torch, which is an error here: a model splitting a batch is not
        splitting channels, and must not be answered as if it were."""
        parts = self.data.split(split_size_or_sections, dim=_channel_dim(dim, "split"))
        return tuple(self.with_data(part) for part in parts)

    def chunk(self, chunks: int, dim: int = 0) -> tuple["FeatureMap", ...]:
        """``chunks`` channel groups of the same sites, as ``Tensor.chunk``."""
        return tuple(self.with_data(part) for part in self.data.chunk(chunks, dim=_channel_dim(dim, "chunk")))

    def __getitem__(self, index) -> "FeatureMap":
        """A channel slice of the same sites, written as NCHW indexing: ``x[:, a:b]`` or
        ``x[:, a:b, :, :]`` (GhostNet keeps the first ``out_chs`` of its concatenated channels).
        Indexing images or positions has no meaning on active sites and is refused."""
        parts = index if isinstance(index, tuple) else (index,)
        if parts and parts[-1] is Ellipsis:
            parts = parts[:-1]
        if not (2 <= len(parts) <= 4 and isinstance(parts[1], slice)
                and all(_is_whole_slice(p) for i, p in enumerate(parts) if i != 1)):
            raise UnsupportedFeatureOperation(
                f"indexing a SparK feature map selects channels only (x[:, a:b] or x[:, a:b, :, :]), got "
                f"{index!r}: indexing images or positions has no meaning on active sites")
        return self.with_data(self.data[:, parts[1]])

    def contiguous(self) -> "FeatureMap":
        """Itself: a model's ``.contiguous()`` is about memory layout, which each backend manages."""
        return self

    def permute(self, *dims) -> "ChannelsLastView":
        """``x.permute(0, 2, 3, 1)``, NCHW -> NHWC, as channels-last blocks write it (MambaOut): the same
        map seen channels last (:class:`ChannelsLastView`). Any other order would move images, sites or
        channels into each other's places and is refused."""
        order = _permutation(dims)
        if order != _TO_CHANNELS_LAST:
            raise UnsupportedFeatureOperation(
                f"a SparK feature map can be permuted to channels last only, x.permute(0, 2, 3, 1), got "
                f"permute{order}")
        return ChannelsLastView(self)

    @classmethod
    def concat_channels(cls, maps: Sequence["FeatureMap"], dim: int = 1) -> "FeatureMap":
        """Maps of the same sites (same kind, mask and stride), their channels concatenated in order."""
        _channel_dim(dim, "concatenation")
        maps = list(maps)
        if not maps or not all(isinstance(m, FeatureMap) for m in maps):
            kinds = ", ".join(type(m).__name__ for m in maps) or "nothing"
            raise UnsupportedFeatureOperation(
                f"torch.cat of SparK feature maps takes feature maps only, got: {kinds}")
        for other in maps[1:]:
            maps[0]._check_same_sites(other, "concatenate")
        return maps[0].with_data(torch.cat([m.data for m in maps], dim=1))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """``torch.cat`` / ``torch.concat`` / ``torch.split`` / ``torch.chunk`` on feature maps, along
        channels; any other torch function is an error (a model's forward must not see raw tensors of a
        layout that differs per backend)."""
        return _dispatch_torch_function(func, args, kwargs, cls.concat_channels, "SparK feature maps")

    def __getattr__(self, name: str):
        """Reached only for names the map does not define: a ``torch.Tensor`` method is refused like an
        unsupported torch function, naming it (timm's FasterNet ``x.clone()``, ``x.view(...)``), instead
        of a bare AttributeError about the map's class."""
        if name.startswith("__") or not hasattr(torch.Tensor, name):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        sizes = (" (a map's layout differs per backend; its channel count is x.channels, and its sites' grid "
                 "x.mask.map_hw(x.stride))" if name in ("shape", "size", "dim", "ndim") else "")
        raise UnsupportedFeatureMethod(f"Tensor.{name} is not defined on SparK feature maps{sizes}: "
                                       f"{_ALLOWED_IN_A_BLOCK}")


class MaskedDense(FeatureMap):
    """Dense ``(B, C, H, W)`` features, zero at masked sites (SparK's representation)."""

    def __init__(self, data: torch.Tensor, mask: ActiveMask, stride: int):
        self.data, self.mask, self.stride = data, mask, stride

    @classmethod
    def from_image(cls, images: torch.Tensor, mask: ActiveMask) -> "MaskedDense":
        return cls(images * mask.dense_at(1), mask, 1)

    @property
    def channels(self) -> int:
        return self.data.shape[1]

    def site_mask(self) -> torch.Tensor:
        return self.mask.dense_at(self.stride)

    def per_site(self, fn):
        out = fn(self.data.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        # Per-site functions may map zero to non-zero (a Linear's bias): SparK masks them before
        # they reach a residual add, so do it here, once.
        return self.with_data(out * self.site_mask())

    def drop_path(self, drop_prob, training, scale_by_keep=True):
        if drop_prob == 0.0 or not training:
            return self
        keep = sample_drop_path_keep(self.data.shape[0], drop_prob, scale_by_keep, self.data)
        return self.with_data(self.data * keep.view(-1, 1, 1, 1))

    def active_rows(self):
        return self.data.permute(0, 2, 3, 1)[self.site_mask()[:, 0]]

    def with_active_rows(self, rows):
        b, _, h, w = self.data.shape
        out = rows.new_zeros(b, h, w, rows.shape[1])
        out[self.site_mask()[:, 0]] = rows
        return self.with_data(out.permute(0, 3, 1, 2))

    def to_dense(self):
        return self.data


class SparseRows(FeatureMap):
    """``[N, C]`` features of the active sites at ``stride``, rows ordered as ``mask.coords_at(stride)``.

    ``recompute``, when given, remakes ``data`` from tensors autograd keeps anyway (e.g. a ReLU
    output from its BatchNorm's input), so a consumer may save that recipe instead of the rows for
    backward. Any new data (:meth:`with_data`) drops it.
    """

    def __init__(self, data: torch.Tensor, mask: ActiveMask, stride: int,
                 recompute: Optional[Callable[[], torch.Tensor]] = None):
        self.data, self.mask, self.stride, self.recompute = data, mask, stride, recompute

    @classmethod
    def from_image(cls, images: torch.Tensor, mask: ActiveMask) -> "SparseRows":
        pixels = images.permute(0, 2, 3, 1).reshape(-1, images.shape[1])    # a view for channels-last images
        return cls(pixels.index_select(0, mask.flat_index(1)), mask, 1)

    @property
    def channels(self) -> int:
        return self.data.shape[1]

    def per_site(self, fn):
        return self.with_data(fn(self.data))

    def active_rows(self):
        return self.data

    def with_active_rows(self, rows):
        return self.with_data(rows)

    def drop_path(self, drop_prob, training, scale_by_keep=True):
        if drop_prob == 0.0 or not training:
            return self
        keep = sample_drop_path_keep(self.mask.batch_size, drop_prob, scale_by_keep, self.data)
        rows_batch = self.mask.coords_at(self.stride)[:, 0]
        return self.with_data(self.data * keep[rows_batch].unsqueeze(1))

    def to_dense(self):
        batch, (height, width) = self.mask.batch_size, self.mask.map_hw(self.stride)
        out = self.data.new_zeros(batch * height * width, self.channels)
        out = out.index_put((self.mask.flat_index(self.stride),), self.data)
        return out.view(batch, height, width, self.channels).permute(0, 3, 1, 2)


class ChannelsLastView:
    """A feature map as a channels-last block sees it after ``x.permute(0, 2, 3, 1)`` (MambaOut's
    blocks and stem run NHWC: channels-last LayerNorm and Linear layers, ``torch.split`` /
    ``torch.cat`` along ``dim=-1``).

    The sites and values are the map's own; only the meaning of "the last dimension" changes, so
    what a channels-last block does is exact on every backend: per-site layers (Linear, channels-last
    LayerNorm, activations, drop path) go through :meth:`per_site` / :meth:`elementwise` like on the
    map, adds and site-by-site products of views of the same sites, splits and concatenations along
    ``dim=-1``, a per-channel factor of shape ``(C,)`` (timm's ``LayerScale``), and
    ``x.permute(0, 3, 1, 2)`` back to the map. Anything that reads the channels-first layout (a
    conv, a pool, BatchNorm, LayerNorm2d) is refused on a view: in the dense model it would read
    the wrong dimension.
    """

    def __init__(self, channels_first: FeatureMap):
        self.channels_first = channels_first

    @property
    def mask(self) -> ActiveMask:
        return self.channels_first.mask

    @property
    def stride(self) -> int:
        return self.channels_first.stride

    @property
    def channels(self) -> int:
        return self.channels_first.channels

    def permute(self, *dims) -> FeatureMap:
        order = _permutation(dims)
        if order != _TO_CHANNELS_FIRST:
            raise UnsupportedFeatureOperation(
                f"a channels-last view of a SparK feature map can be permuted back to channels first only, "
                f"x.permute(0, 3, 1, 2), got permute{order}")
        return self.channels_first

    def per_site(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "ChannelsLastView":
        return ChannelsLastView(self.channels_first.per_site(fn))

    def elementwise(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "ChannelsLastView":
        return ChannelsLastView(self.channels_first.elementwise(fn))

    def drop_path(self, drop_prob: float, training: bool, scale_by_keep: bool = True) -> "ChannelsLastView":
        return ChannelsLastView(self.channels_first.drop_path(drop_prob, training, scale_by_keep))

    def contiguous(self) -> "ChannelsLastView":
        return self

    def _same_sites(self, other: object, operation: str) -> FeatureMap:
        if not isinstance(other, ChannelsLastView):
            raise UnsupportedFeatureOperation(
                f"cannot {operation} a channels-last view of a SparK feature map and a "
                f"{type(other).__name__}: both must be views of maps of the same sites")
        return other.channels_first

    def _addend(self, other: object, operation: str) -> object:
        """Another view's map; numbers and tensors as they are, so that the map's own rules apply (``+ 0`` is
        exact, ``+ 0.1`` is refused saying it would make the masked sites non-zero)."""
        if isinstance(other, (ChannelsLastView, FeatureMap)):
            return self._same_sites(other, operation)
        return other

    def __add__(self, other: Union["ChannelsLastView", int, float]) -> "ChannelsLastView":
        return ChannelsLastView(self.channels_first + self._addend(other, "add"))

    __iadd__ = __radd__ = __add__

    def __sub__(self, other: Union["ChannelsLastView", int, float]) -> "ChannelsLastView":
        return ChannelsLastView(self.channels_first - self._addend(other, "subtract"))

    def __rsub__(self, other: Union[int, float]) -> "ChannelsLastView":
        """``0 - x`` is ``-x``; other numbers are refused, as for the map."""
        return ChannelsLastView(other - self.channels_first)

    def __neg__(self) -> "ChannelsLastView":
        return ChannelsLastView(-self.channels_first)

    def __truediv__(self, divisor: Union[torch.Tensor, int, float]) -> "ChannelsLastView":
        """Divided by one scalar, as the map is (any other divisor is refused there)."""
        return ChannelsLastView(self.channels_first / divisor)

    def __mul__(self, factor: Union["ChannelsLastView", torch.Tensor, int, float]) -> "ChannelsLastView":
        """Times a view of the same sites and channels (MambaOut's gate ``act(g) * cat(i, c)``), one
        scalar, or a per-channel factor written channels last, ``(C,)`` or ``(1, 1, 1, C)``."""
        if isinstance(factor, (ChannelsLastView, FeatureMap)):      # a channels-first map is refused, as in +
            return ChannelsLastView(self.channels_first * self._same_sites(factor, "multiply"))
        if isinstance(factor, torch.Tensor) and not _is_scalar(factor):
            if factor.shape not in ((self.channels,), (1, 1, 1, self.channels)):
                raise UnsupportedFeatureOperation(
                    f"a channels-last view of a SparK feature map can be multiplied by one scalar, a per-channel "
                    f"factor of shape ({self.channels},) or a view of the same sites only, not by a tensor of "
                    f"shape {tuple(factor.shape)}")
            factor = factor.reshape(1, self.channels, 1, 1)
        return ChannelsLastView(self.channels_first * factor)

    __rmul__ = mul = __mul__

    def mul_(self, factor: Union[torch.Tensor, int, float]) -> "ChannelsLastView":
        """``x.mul_(gamma)`` (timm's in-place ``LayerScale``): this view holds the product afterwards."""
        self.channels_first = (self * factor).channels_first
        return self

    def split(self, split_size_or_sections: Union[int, Sequence[int]], dim: int = 0) -> tuple["ChannelsLastView", ...]:
        parts = self.channels_first.split(split_size_or_sections, dim=_channel_dim(dim, "split", channels_last=True))
        return tuple(ChannelsLastView(part) for part in parts)

    def chunk(self, chunks: int, dim: int = 0) -> tuple["ChannelsLastView", ...]:
        parts = self.channels_first.chunk(chunks, dim=_channel_dim(dim, "chunk", channels_last=True))
        return tuple(ChannelsLastView(part) for part in parts)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """``torch.cat`` / ``torch.split`` / ``torch.chunk`` along ``dim=-1`` and ``torch.permute`` back;
        any other torch function is refused as on a feature map."""
        return _dispatch_torch_function(func, args, kwargs, cls.concat_channels,
                                        "a channels-last view of SparK feature maps")

    @staticmethod
    def concat_channels(views: Sequence["ChannelsLastView"], dim: int = -1) -> "ChannelsLastView":
        """Views of maps of the same sites, their channels concatenated in order (``dim=-1``)."""
        views = list(views)
        if not all(isinstance(v, ChannelsLastView) for v in views):
            raise UnsupportedFeatureOperation("torch.cat of channels-last views takes such views only, got: "
                                              + ", ".join(type(v).__name__ for v in views))
        dim = _channel_dim(dim, "concatenation", channels_last=True)
        return ChannelsLastView(FeatureMap.concat_channels([v.channels_first for v in views], dim))

    def __getattr__(self, name: str):
        """Reached for what a view does not define: the layout-reading parts of a feature map (``data``,
        ``active_rows``, ... which convs, pools and BatchNorm read) and torch.Tensor methods."""
        if name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        raise UnsupportedFeatureMethod(
            f"{name!r} of a channels-last view (x.permute(0, 2, 3, 1)) of a SparK feature map: a layer that reads "
            f"the channels-first layout (a conv, a pool, BatchNorm, LayerNorm2d) would read another dimension "
            f"of an NHWC tensor in the dense model; permute back with x.permute(0, 3, 1, 2) first")

    def __repr__(self) -> str:
        return f"ChannelsLastView({self.channels_first!r})"
