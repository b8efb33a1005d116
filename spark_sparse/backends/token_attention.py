"""Softmax attention among each image's ACTIVE tokens (CAFormer's, FastViT-SA's and MobileNet-V4-Hybrid's
attention), for both representations.

SparK's encoder must behave as if the masked patches did not exist. For a softmax attention layer
that means: each active token attends to the active tokens of its own image, and masked positions
are neither keys nor values (the squeeze of SE averages over active sites for the same reason,
SparK issue 54). Run unchanged on SparK's masked map, timm's layer would instead see every masked
position as a key with ``k = 0`` (its Linear output, masked), logit ``q . 0 = 0``: each one adds
``exp(0)`` to the softmax's denominator and nothing to its numerator, shrinking every output by an
amount that depends on how much of the image is hidden. That is not computed here.

Both representations run it as one ``F.scaled_dot_product_attention`` over a padded batch
``[B, heads, L, d]`` with a key mask, from the active rows' queries, keys and values:

- :class:`~spark_sparse.features.MaskedDense`: the dense model's own token grid, ``L = H * W``, each
  active site at its position ``y * W + x`` and masked positions as padding: SparK's masked map, with
  its masked tokens taken out of the softmax;
- :class:`~spark_sparse.features.SparseRows`: each image's active rows packed first, ``L`` = the most
  active sites of any image (SparK keeps the same number of patches visible in every image, so
  nothing is padded during training).

Rows reach their slots through ``index_copy`` and come back through ``index_select`` (deterministic
backward: see :mod:`.per_image`).
"""
from __future__ import annotations

from functools import singledispatch
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..features import ChannelsLastView, FeatureMap, MaskedDense, SparseRows, UnsupportedFeatureOperation
from .common import adopt_module
from .per_image import active_counts

__all__ = ["FeatureTokenAttention", "attend_among_active_tokens", "describe_token_attention", "map_of_tokens",
           "token_batch", "token_positions", "token_rows", "token_slots"]


def map_of_tokens(x: ChannelsLastView, layer_name: str) -> FeatureMap:
    """The map of the token sequence ``x`` given to a layer that, as its timm original, takes a token sequence
    ``[B, N, C]`` (here a map's channels-last view); a map itself is refused, naming the layer."""
    if not isinstance(x, ChannelsLastView):
        raise UnsupportedFeatureOperation(f"{layer_name}: this layer takes the token sequence (a channels-last view), "
                                          f"as timm's does, got a {type(x).__name__}")
    return x.channels_first


@singledispatch
def token_slots(x: FeatureMap) -> tuple[torch.Tensor, int]:
    """``(slots [N], L)``: where each active row of ``x`` sits in a ``[B * L]`` padded token batch."""
    raise NotImplementedError(f"no token layout for {type(x).__name__}")


@token_slots.register
def _(x: MaskedDense) -> tuple[torch.Tensor, int]:
    height, width = x.data.shape[-2:]
    return x.mask.flat_index(x.stride), height * width


@token_slots.register
def _(x: SparseRows) -> tuple[torch.Tensor, int]:
    def build() -> tuple[torch.Tensor, int]:
        image_of_row = x.mask.coords_at(x.stride)[:, 0]
        counts = active_counts(x, torch.long)
        first_row = counts.cumsum(0) - counts
        length = int(counts.max())
        rank = torch.arange(image_of_row.shape[0], device=image_of_row.device) - first_row.index_select(0, image_of_row)
        return image_of_row * length + rank, length
    return x.mask.cached(("token-slots-packed", x.stride), build)


def token_positions(x: FeatureMap) -> torch.Tensor:
    """``[B, L]``: the map position ``y * W + x`` of the token in each slot of :func:`token_slots` (0 where no
    active row is), for attention biases indexed by position (EfficientFormer's)."""
    def build() -> torch.Tensor:
        slots, length = token_slots(x)
        _, y, w = x.mask.coords_at(x.stride).unbind(1)
        width = x.mask.map_hw(x.stride)[1]
        positions = torch.zeros(x.mask.batch_size * length, dtype=torch.long, device=slots.device)
        return positions.index_copy_(0, slots, y * width + w).view(x.mask.batch_size, length)
    return x.mask.cached(("token-positions", type(x).__name__, x.stride), build)


def describe_token_attention(feature_type: type) -> str:
    """What runs an attention layer on ``feature_type`` maps, for the backend's printed plan."""
    if issubclass(feature_type, MaskedDense):
        return "dense softmax attention over the token grid, masked keys left out (torch SDPA)"
    return "sdpa       softmax attention among each image's packed active rows (torch SDPA)"


def token_batch(x: FeatureMap, rows: torch.Tensor) -> torch.Tensor:
    """``[N, heads, d]`` rows of ``x``'s active sites -> the padded token batch ``[B, heads, L, d]`` of
    :func:`token_slots`, zero where no row is (sums over its tokens are sums over the image's active sites)."""
    slots, length = token_slots(x)
    return _padded(rows, slots, x.mask.batch_size, length)


def token_rows(x: FeatureMap, tokens: torch.Tensor) -> torch.Tensor:
    """A token batch ``[B, heads, L, d]`` laid out as :func:`token_batch` makes it -> ``[N, heads * d]``, the
    rows of ``x``'s active sites, heads concatenated as timm's layers do."""
    slots, length = token_slots(x)
    return tokens.transpose(1, 2).reshape(x.mask.batch_size * length, -1).index_select(0, slots)


def _padded(rows: torch.Tensor, slots: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """``[N, heads, d]`` rows -> ``[B, heads, L, d]``, zero in the slots no row fills."""
    grid = rows.new_zeros(batch * length, *rows.shape[1:]).index_copy(0, slots, rows)
    return grid.view(batch, length, *rows.shape[1:]).transpose(1, 2)


def _pair_bias(keys: FeatureMap, position_bias: Optional[torch.Tensor], image_bias: Optional[torch.Tensor]
               ) -> torch.Tensor:
    """``[B or 1, heads or 1, L, L]``: the logit biases of :func:`attend_among_active_tokens` for each pair of
    token slots of ``keys``.

    A dense map's slots are its positions (:func:`token_slots`), so the tables apply as they are, broadcast
    over the images as in timm's layer. Packed rows look each pair's bias up by its positions: one
    ``index_select`` / ``gather`` on the flattened table, whose backward is a plain scatter-add (advanced
    indexing ``table[:, i, j]`` backpropagates through an accumulating ``index_put``, 3x slower on Swin's
    first-stage windows)."""
    batch = keys.mask.batch_size
    per_image = None
    if image_bias is not None:
        image_of = torch.arange(batch, device=image_bias.device) % image_bias.shape[0]
        per_image = image_bias.index_select(0, image_of)                                    # [B, P, P]
    table = position_bias if position_bias is not None else per_image
    side = table.shape[-1]
    _, length = token_slots(keys)
    if isinstance(keys, MaskedDense) and length == side:
        bias = position_bias.unsqueeze(0) if position_bias is not None else 0
        return bias + per_image.unsqueeze(1) if per_image is not None else bias
    positions = token_positions(keys)                                                       # [B, L]
    pairs = keys.mask.cached(("token-position-pairs", type(keys).__name__, keys.stride, side),
                             lambda: (positions.unsqueeze(2) * side + positions.unsqueeze(1)).view(batch, -1))
    bias = 0
    if position_bias is not None:
        heads = position_bias.shape[0]
        bias = position_bias.reshape(heads, side * side).index_select(1, pairs.view(-1))
        bias = bias.view(heads, batch, length, length).transpose(0, 1)                      # [B, heads, L, L]
    if per_image is not None:
        bias = bias + per_image.view(batch, side * side).gather(1, pairs).view(batch, 1, length, length)
    return bias


def attend_among_active_tokens(queries: FeatureMap, query: torch.Tensor, keys: FeatureMap, key: torch.Tensor,
                               value: torch.Tensor, scale: float, dropout_p: float = 0.0,
                               position_bias: Optional[torch.Tensor] = None,
                               image_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[N_q, heads * d_v]``: softmax attention of ``query`` (``[N_q, heads, d]``, rows of the active sites of
    ``queries``) over ``key`` and ``value`` (``[N_k, heads, d_v]``, rows of the active sites of ``keys``: the same
    map, or one at a coarser stride as MobileNet-V4's downsampled keys) among the active tokens of each image,
    heads concatenated as timm's layers do.

    Additive logit biases by the map positions ``i`` of a query and ``j`` of a key (``y * W + x``,
    :func:`token_positions`; self-attention only, ``keys is queries``):

    - ``position_bias`` ``[heads, P, P]``: the same for every image (relative position biases);
    - ``image_bias`` ``[G, P, P]``: per image, every head alike; image ``b`` takes ``image_bias[b % G]`` (Swin's
      shifted-window region mask: a map of windows, ``G`` windows per image, image-major as timm's)."""
    batch = queries.mask.batch_size
    key_slots, key_length = token_slots(keys)
    is_key = torch.zeros(batch * key_length, dtype=torch.bool, device=key_slots.device).index_fill_(0, key_slots, True)
    is_key = is_key.view(batch, key_length)
    # a group of tokens without any active one (MobileViT's patch positions, DaViT's windows) would
    # softmax over no key at all (NaN): give it its first (zero) padding slot; none of its rows is read back
    is_key[:, 0] |= ~is_key.any(1)
    attn_mask = is_key.view(batch, 1, 1, key_length)
    if position_bias is not None or image_bias is not None:
        if keys is not queries:
            raise ValueError("a position or image bias is defined for self-attention only (keys is queries)")
        bias = _pair_bias(keys, position_bias, image_bias)
        attn_mask = bias.to(query.dtype).masked_fill(~attn_mask, float("-inf"))
    out = F.scaled_dot_product_attention(
        token_batch(queries, query), token_batch(keys, key), token_batch(keys, value),
        attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    return token_rows(queries, out)


class FeatureTokenAttention(nn.Module):
    """timm's multi-head softmax self-attention over a map's tokens (``qkv`` Linear, scaled dot-product
    attention, ``proj`` Linear: CAFormer's and FastViT's ``Attention``, ``timm.layers.Attention`` in MobileViT,
    DaViT's ``WindowAttention`` per window) among each image's active tokens.

    The same children (``qkv``, ``attn_drop``, ``proj``, ``proj_drop``; ``timm.layers.Attention``'s ``q_norm``,
    ``k_norm``, ``norm`` and ``gate`` too, per token or per head), names and parameters; they act on rows as on
    timm's tokens, so none is converted. ``tokens_channels_last``: the layer is given the token sequence
    ``[B, H * W, C]`` (a map's :class:`~spark_sparse.features.ChannelsLastView` here: CAFormer's token stages),
    else the map itself, which timm's layer flattens (FastViT).
    """

    def __init__(self, attention: nn.Module, name: str, tokens_channels_last: bool, feature_type: type,
                 scale: Optional[float] = None):
        super().__init__()
        adopt_module(self, attention)
        self.num_heads = attention.num_heads
        self.scale = attention.scale if scale is None else scale      # Swin-V2 scales its queries instead
        self.head_dim = attention.qkv.out_features // (3 * attention.num_heads)   # DaViT's layer keeps no head_dim
        self.tokens_channels_last, self.layer_name, self.feature_type = tokens_channels_last, name, feature_type

    @classmethod
    def of_token_sequence(cls, backend, attention: nn.Module, name: str = "") -> "FeatureTokenAttention":
        return cls(attention, name, tokens_channels_last=True, feature_type=backend.feature_type)

    @classmethod
    def of_map(cls, backend, attention: nn.Module, name: str = "") -> "FeatureTokenAttention":
        return cls(attention, name, tokens_channels_last=False, feature_type=backend.feature_type)

    def describe_execution(self, device, dtype) -> str:
        return describe_token_attention(self.feature_type)

    def forward(self, x: Union[FeatureMap, ChannelsLastView], attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> Union[FeatureMap, ChannelsLastView]:
        if isinstance(x, ChannelsLastView) != self.tokens_channels_last:
            wanted = "a token sequence (a channels-last view)" if self.tokens_channels_last else "a feature map"
            raise UnsupportedFeatureOperation(f"{self.layer_name}: {type(self).__name__} takes {wanted} here, as "
                                              f"timm's layer does, got a {type(x).__name__}")
        if attn_mask is not None or is_causal:
            raise UnsupportedFeatureOperation(f"{self.layer_name}: an attention mask of the caller's (or a causal one) "
                                              f"is not supported: the mask here is SparK's")
        tokens = x.channels_first if self.tokens_channels_last else x
        out = self.attend(tokens)
        return ChannelsLastView(out) if self.tokens_channels_last else out

    def queries_keys_values(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[N, C]`` rows -> their queries, keys and values ``[N, heads, d]`` each, as the logits
        ``q k^T * scale`` take them (Swin-V2's cosine attention overrides it)."""
        query, key, value = self.qkv(rows).view(rows.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        if getattr(self, "q_norm", None) is not None:                 # timm.layers.Attention's qk-norm (per head)
            query, key = self.q_norm(query), self.k_norm(key)
        return query, key, value

    def attend(self, tokens: FeatureMap, position_bias: Optional[torch.Tensor] = None,
               image_bias: Optional[torch.Tensor] = None) -> FeatureMap:
        """The layer on the map ``tokens``: each active token among its image's active tokens, with the logit
        biases of :func:`attend_among_active_tokens` (Swin's window attention passes its own)."""
        rows = tokens.active_rows()
        query, key, value = self.queries_keys_values(rows)
        attn_drop = getattr(self, "attn_drop", None)                    # DaViT's window attention has none
        out = attend_among_active_tokens(tokens, query, tokens, key, value, self.scale,
                                         attn_drop.p if self.training and attn_drop is not None else 0.0,
                                         position_bias=position_bias, image_bias=image_bias)
        if getattr(self, "norm", None) is not None:                   # its scale norm, then its output gate
            out = self.norm(out)
        if getattr(self, "gate", None) is not None:
            out = out * self.gate(rows).sigmoid()
        out = self.proj(out)
        if getattr(self, "proj_drop", None) is not None:
            out = self.proj_drop(out)
        return tokens.with_active_rows(out)
