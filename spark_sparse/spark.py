"""SparK: mask, sparse-encode, densify with mask tokens, decode, regress normalised masked patches.

A re-implementation of SparK's ``pretrain/spark.py`` around explicit objects: the
:class:`~spark_sparse.mask.ActiveMask` is passed down instead of a global, and the encoder runs on a
pluggable :class:`~spark_sparse.backends.Backend`. Whatever the backend, the densify step receives
feature maps that are exactly zero at masked sites, so decoder and loss never know which ran.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
from timm.layers import convert_sync_batchnorm, trunc_normal_

from .backends import Backend, UnsupportedModuleError, create_backend
from .backends.base import refuse_converted
from .backends.common import FeatureBatchNorm, FeatureLayerNorm, FeatureSyncBatchNorm
from .decoder import SPARK_DECODER_WIDTH, LightDecoder, check_decoder_width
from .errors import ConfigError
from .features import FeatureMap, FeatureMapMismatch, UnsupportedFeatureOperation
from .mask import ActiveMask, kept_patches_per_image
from .models import create_encoder, resolve_model_name
from .models.contract import check_encoder
from .models.timm_encoders import guess_densify_norm

__all__ = ["SparK", "create_spark", "patchify", "unpatchify", "normalize_patches"]

SizeLike = Union[int, tuple[int, int]]
_FeatureMapError = Union[UnsupportedFeatureOperation, FeatureMapMismatch]


def _as_hw(size: SizeLike) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, L, p*p*C)``, patches row-major, pixels ``(py, px, c)`` (SparK's order)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = patches.shape[0]
    h, w = grid_hw
    c = patches.shape[-1] // (patch * patch)
    x = torch.einsum("bhwpqc->bchpwq", patches.reshape(b, h, w, patch, patch, c))
    return x.reshape(b, c, h * patch, w * patch)


def normalize_patches(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SparK's per-patch target: ``(x - mean) / sqrt(unbiased var + 1e-6)``; returns (target, mean, std)."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
    return (patches - mean) / std, mean, std


def _naming_the_module(error: _FeatureMapError, encoder: nn.Module) -> _FeatureMapError:
    """``error`` (a block's forward asked a feature map for something it cannot do, or combined maps of other
    sites) with the innermost module of
    ``encoder`` whose forward was running when it was raised, found in its traceback: a user's block is named
    without any cost to forwards that succeed. Messages that name their layer already are kept as they are."""
    names = {id(module): name for name, module in encoder.named_modules()}
    culprit, frame = None, error.__traceback__
    while frame is not None:
        candidate = frame.tb_frame.f_locals.get("self")
        if isinstance(candidate, nn.Module) and id(candidate) in names:
            culprit = candidate
        frame = frame.tb_next
    if culprit is None or (names[id(culprit)] and names[id(culprit)] in str(error)):
        return error
    kind = f"{type(culprit).__module__}.{type(culprit).__qualname__}"
    where = f"module {names[id(culprit)]!r} ({kind})" if names[id(culprit)] else f"the encoder's own forward ({kind})"
    named = type(error)(f"in {where}: {error}")
    named.__traceback__ = error.__traceback__
    return named


def _weight_layout(encoder: nn.Module) -> dict[str, tuple[int, ...]]:
    """The names and shapes of ``encoder``'s weights and buffers, as its state dict holds them."""
    return {name: tuple(tensor.shape) for name, tensor in encoder.state_dict().items()}


def _check_weight_layout_kept(dense: dict[str, tuple[int, ...]], converted: nn.Module, backend: str) -> None:
    """A conversion must keep every weight's name and shape: the exported encoder loads into the dense model by
    them (a converter that returned its wrapper's inner layer renamed ``stem.conv.conv.weight`` to
    ``stem.conv.weight``, and the export then failed to load, after the whole pre-training)."""
    after = _weight_layout(converted)
    if after == dense:
        return
    lost = [name for name in dense if name not in after]
    new = [name for name in after if name not in dense]
    reshaped = [f"{name} {dense[name]} -> {after[name]}" for name in dense if name in after and dense[name] != after[name]]
    parts = [f"{label} {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
             for label, names in (("lost", lost), ("new", new), ("reshaped", reshaped)) if names]
    raise UnsupportedModuleError(
        f"converting the encoder for backend {backend!r} changed its weights' names or shapes ({'; '.join(parts)}): "
        f"a converter must keep its layer's parameters and buffers under the same names (register them on the "
        f"module it returns, as the dense layer had them), so that the pre-trained encoder loads into the dense "
        f"model")


class SparK(nn.Module):
    """SparK pre-training model around a hierarchical ``encoder`` and a ``backend``.

    Args:
        encoder: a dense encoder following the contract of :mod:`spark_sparse.models.registry`;
            it is converted in place by ``backend``.
        backend: a :class:`Backend` or its registered name.
        input_size: default image size ``H`` or ``(H, W)``, multiples of the downsample ratio.
        mask_ratio: fraction of patches hidden.
        densify_norm: ``"bn"`` (SparK's choice for ResNets), ``"ln"`` (ConvNeXts) or ``"identity"``;
            ``None`` takes the encoder's ``densify_norm`` attribute, else ``"bn"``.
        decoder_width: width of the coarsest decoder level (SparK: 768).
        sync_bn: synchronise BatchNorm statistics across processes (SparK's ``--sbn``).
    """

    def __init__(self, encoder: nn.Module, backend: Union[Backend, str] = "masked", input_size: SizeLike = 224,
                 mask_ratio: float = 0.6, densify_norm: Optional[str] = None, decoder_width: int = SPARK_DECODER_WIDTH,
                 sync_bn: bool = False):
        super().__init__()
        refuse_converted(encoder)                # before anything below changes it (SyncBatchNorm, heads' flags)
        self.backend = create_backend(backend) if isinstance(backend, str) else backend
        self.downsample_ratio = int(encoder.get_downsample_ratio())
        decoder_width = check_decoder_width(self.downsample_ratio, decoder_width)    # before the encoder changes
        self.input_hw = _as_hw(input_size)
        self._check_image_hw(self.input_hw)
        self.mask_ratio = float(mask_ratio)
        self.len_keep = kept_patches_per_image(self.grid_hw(self.input_hw)[0] * self.grid_hw(self.input_hw)[1], mask_ratio)
        self.sync_bn = sync_bn
        self.channels_last = False

        # Heads the hierarchical forward never calls get no gradient: freeze them so optimizers and
        # DDP (find_unused_parameters=False) see only what trains. They are still exported.
        for name in getattr(encoder, "modules_outside_hierarchy", lambda: [])():
            encoder.get_submodule(name).requires_grad_(False)
        if sync_bn:   # timm's conversion keeps BatchNormAct2d's activation (torch's would drop it)
            encoder = convert_sync_batchnorm(encoder)
        dense_weights = _weight_layout(encoder)          # before the conversion, which may work in place
        dense_norm = guess_densify_norm(encoder)
        self.encoder = self.backend.convert(encoder)
        _check_weight_layout_kept(dense_weights, self.encoder, self.backend.name)
        self.decoder = LightDecoder(self.downsample_ratio, width=decoder_width, sync_bn=sync_bn)

        # SparK's rule, for any encoder: LayerNorm-only nets densify with LayerNorm (and get Adam's beta2 0.999)
        self.densify_norm_kind = (densify_norm or getattr(encoder, "densify_norm", None)
                                  or dense_norm).lower()
        self.densify_norms = nn.ModuleList()
        self.densify_projs = nn.ModuleList()
        self.mask_tokens = nn.ParameterList()
        enc_widths = list(encoder.get_feature_map_channels())
        dec_width = decoder_width
        for level, enc_width in enumerate(reversed(enc_widths)):   # coarsest first
            token = nn.Parameter(torch.zeros(1, enc_width, 1, 1))
            trunc_normal_(token, mean=0, std=0.02, a=-0.02, b=0.02)
            self.mask_tokens.append(token)
            self.densify_norms.append(self._make_densify_norm(enc_width))
            if level == 0 and enc_width == dec_width:
                proj = nn.Identity()
            else:
                k = 1 if level == 0 else 3
                proj = nn.Conv2d(enc_width, dec_width, kernel_size=k, stride=1, padding=k // 2, bias=True)
            self.densify_projs.append(proj)
            dec_width //= 2

    def _make_densify_norm(self, width: int) -> nn.Module:
        if self.densify_norm_kind == "bn":
            return (FeatureSyncBatchNorm if self.sync_bn else FeatureBatchNorm)(width)
        if self.densify_norm_kind == "ln":
            return FeatureLayerNorm(width, eps=1e-6)
        if self.densify_norm_kind == "identity":
            return nn.Identity()
        raise ValueError(f"densify_norm must be 'bn', 'ln' or 'identity', got {self.densify_norm_kind!r}")

    # ------------------------------------------------------------------ shapes and masks
    def grid_hw(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        return image_hw[0] // self.downsample_ratio, image_hw[1] // self.downsample_ratio

    def _check_image_hw(self, hw: tuple[int, int]) -> None:
        if hw[0] % self.downsample_ratio or hw[1] % self.downsample_ratio or min(hw) <= 0:
            raise ConfigError(f"input size {hw[0]}x{hw[1]}: each side must be a positive multiple of the downsample "
                              f"ratio {self.downsample_ratio} (e.g. 224)")

    def mask(self, batch_size: int, generator: Optional[torch.Generator] = None,
             device: Optional[torch.device] = None, image_hw: Optional[tuple[int, int]] = None) -> ActiveMask:
        """A random SparK mask for ``batch_size`` images of ``image_hw`` (default: ``input_size``)."""
        hw = image_hw or self.input_hw
        self._check_image_hw(hw)
        return ActiveMask.random(batch_size, self.grid_hw(hw), self.mask_ratio, self.downsample_ratio,
                                 generator=generator, device=device)

    def _check_images(self, images: torch.Tensor) -> None:
        """Refuse what no forward can use, with the fix, before a conv deep inside fails on it (a dtype mismatch there
        names neither the images nor the weights)."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be one tensor (B, 3, H, W), got {type(images).__name__} (a list of images: "
                            f"torch.stack them)")
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        if images.shape[0] < 1 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) with B at least 1 (SparK reconstructs RGB images), got "
                             f"shape {tuple(images.shape)}")
        weights = self.mask_tokens[0].dtype
        if images.dtype != weights:
            fix = ("scale them to floats as the loader does (images.float() / 255, then normalise with ImageNet's mean "
                   "and std)" if not images.is_floating_point() else
                   f"convert them with images.to({weights}), or the model with spark.to({images.dtype}); for mixed "
                   f"precision keep both {weights} and run under torch.autocast")
            raise TypeError(f"images are {images.dtype}, the model's weights {weights}: {fix}")
        self._check_image_hw(tuple(images.shape[-2:]))

    def _resolve_mask(self, images: torch.Tensor, active_mask) -> ActiveMask:
        self._check_images(images)
        if active_mask is None:
            return self.mask(images.shape[0], device=images.device, image_hw=tuple(images.shape[-2:]))
        if not isinstance(active_mask, ActiveMask):
            active_mask = ActiveMask(torch.as_tensor(active_mask), self.downsample_ratio)
        active_mask = active_mask.to(images.device)
        active_mask.check_matches(images)
        return active_mask

    # ------------------------------------------------------------------ the model
    def encode(self, images: torch.Tensor, mask: ActiveMask) -> list[FeatureMap]:
        """Hierarchical features of the masked images, finest first, in the backend's representation."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        try:
            return self.encoder(self.backend.features_from_image(images, mask), hierarchical=True)
        except (UnsupportedFeatureOperation, FeatureMapMismatch) as err:
            raise _naming_the_module(err, self.encoder) from None

    def densify(self, features: list[FeatureMap]) -> list[torch.Tensor]:
        """Coarsest first: norm over active sites, mask tokens at masked sites, projection."""
        to_dec = []
        for level, fmap in enumerate(reversed(features)):
            fmap = self.densify_norms[level](fmap)
            site_mask = fmap.mask.dense_at(fmap.stride)
            dense = torch.where(site_mask, fmap.to_dense(), self.mask_tokens[level].to(fmap.data.dtype))
            if self.channels_last:
                dense = dense.contiguous(memory_format=torch.channels_last)
            to_dec.append(self.densify_projs[level](dense))
        return to_dec

    def predict(self, images: torch.Tensor, mask: ActiveMask) -> torch.Tensor:
        """The decoder's full-resolution output ``(B, 3, H, W)`` (normalised-patch space)."""
        return self.decoder(self.densify(self.encode(images, mask)))

    # ------------------------------------------------------------------ speed options (same maths)
    def to_channels_last(self) -> "SparK":
        """Run the dense parts (masked encoder, densify projections, decoder) in NHWC.

        oneDNN and cuDNN are markedly faster on NHWC convolutions; values are unchanged up to
        float rounding. Sparse backends keep their ``[N, C]`` rows, which are NHWC already.
        """
        self.channels_last = True
        self.to(memory_format=torch.channels_last)
        # one value per channel ([1, C, 1, 1]: the mask tokens) is the same memory in either layout, but the
        # channels-last strides differ from those of its gradient, which DDP then copies at every step
        for param in self.parameters():
            if param.dim() == 4 and param.numel() == param.shape[1]:
                param.data = param.data.clone(memory_format=torch.contiguous_format)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> "SparK":
        """Recompute each decoder block in backward instead of keeping its activations.

        The recomputation restores the blocks' BatchNorm running statistics afterwards, so the
        statistics (and everything else) equal those of a run without checkpointing.
        """
        self.decoder.grad_checkpointing = enable
        return self

    def loss(self, images: torch.Tensor, prediction: torch.Tensor, mask: ActiveMask) -> torch.Tensor:
        """Mean over masked patches of the per-patch MSE to the normalised target."""
        target, _, _ = normalize_patches(patchify(images, self.downsample_ratio))
        pred = patchify(prediction, self.downsample_ratio)
        per_patch = ((pred - target) ** 2).mean(dim=2)
        hidden = mask.active.logical_not().view(mask.batch_size, -1).to(per_patch.dtype)
        return (per_patch * hidden).sum() / (hidden.sum() + 1e-8)

    def forward(self, images: torch.Tensor, active_mask: Optional[ActiveMask] = None) -> torch.Tensor:
        """The SparK loss of ``images`` ``(B, 3, H, W)`` under ``active_mask`` (random when ``None``)."""
        mask = self._resolve_mask(images, active_mask)
        return self.loss(images, self.predict(images, mask), mask)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, active_mask: Optional[ActiveMask] = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input, masked input, reconstruction)``, each ``(B, 3, H, W)`` in the images' space.

        The reconstruction keeps visible patches and pastes the prediction into masked ones,
        de-normalised with each patch's own mean and std (as SparK's visualisation does).
        """
        mask = self._resolve_mask(images, active_mask)
        pixel_mask = mask.dense_at(1)
        patches = patchify(images, self.downsample_ratio)
        _, mean, std = normalize_patches(patches)
        pred = patchify(self.predict(images, mask), self.downsample_ratio)
        rec = unpatchify(pred * std + mean, self.downsample_ratio, mask.grid_hw)
        return images, images * pixel_mask, torch.where(pixel_mask, images, rec)

    # ------------------------------------------------------------------ export
    def encoder_state_dict(self) -> dict:
        """The encoder's weights in the dense model's own layout (timm names for timm models)."""
        export = getattr(self.encoder, "timm_state_dict", None)
        return export() if export is not None else self.encoder.state_dict()

    def extra_repr(self) -> str:
        return (f"backend={self.backend.name}, input={self.input_hw[0]}x{self.input_hw[1]}, mask_ratio={self.mask_ratio}, "
                f"patch={self.downsample_ratio}, densify_norm={self.densify_norm_kind}")


#: constructor arguments that have no meaning for a SparK encoder, and what to do instead
_NOT_FOR_AN_ENCODER = {
    "num_classes": "the encoder is built without a classifier (a timm model's export loads into "
                   "timm.create_model(name, num_classes=0) strictly, or with any num_classes and strict=False); "
                   "for your own model, leave its classifier out of the encoder (the feature-map forward never "
                   "trains one)",
    "pretrained": "weights are never downloaded: start from a file (--init_weight; Python: "
                  "spark_sparse.checkpoint.load_pretrained)",
}


def _check_model_kwargs(model_kwargs: dict) -> None:
    """Refuse constructor arguments a SparK encoder cannot take, before the model is built."""
    if isinstance(model_kwargs.get("model_kwargs"), dict):     # PretrainConfig's field, given to create_spark
        spelled = ", ".join(f"{key}={value!r}" for key, value in model_kwargs["model_kwargs"].items())
        raise ConfigError(f"create_spark takes the model's constructor arguments as keywords of its own "
                          f"(create_spark(name, {spelled})), not as model_kwargs={{...}}; "
                          f"create_spark(name, **model_kwargs) passes a dict")
    problems = [f"{key}: {why}" for key, why in _NOT_FOR_AN_ENCODER.items() if key in model_kwargs]
    if model_kwargs.get("in_chans", 3) != 3:
        problems.append(f"in_chans={model_kwargs['in_chans']}: SparK reconstructs the 3 channels of RGB images (the "
                        f"decoder's output, the loss's patches and the loader's crops are RGB)")
    if problems:
        raise ConfigError(f"model arguments SparK cannot use: {'; '.join(problems)}")


def _built_encoder(model: nn.Module, drop_path_rate: Optional[float], model_kwargs: dict) -> nn.Module:
    """A user's encoder instance, checked against the contract as a registered one is when created; it becomes
    the SparK model's own (converted in place, so it trains), and so serves one SparK model."""
    given = [*(["drop_path_rate"] if drop_path_rate is not None else []), *model_kwargs]
    if given:
        raise ConfigError(f"create_spark was given a built {type(model).__name__}, so {', '.join(given)} cannot reach "
                          f"its constructor; build the encoder with them, or register its factory "
                          f"(@spark_sparse.register_model) and pass its name")
    refuse_converted(model)
    check_encoder(model, type(model).__name__)
    return model


def create_spark(model: Union[str, nn.Module], /, backend: Union[str, Backend] = "masked", input_size: SizeLike = 224,
                 mask_ratio: float = 0.6, drop_path_rate: Optional[float] = None, *, sync_bn: bool = False,
                 decoder_width: int = SPARK_DECODER_WIDTH, strict_backend: bool = False, **model_kwargs) -> SparK:
    """Build a SparK model: registered encoder ``model`` (or an encoder already built, which becomes the model's
    own: its layers are converted in place) running on ``backend``.

    ``drop_path_rate=None`` uses SparK's default for the model. ``strict_backend`` makes a layer
    that the backend's preferred kernel cannot run an error instead of a fallback. Extra keyword
    arguments go to the encoder's factory (for timm models: ``timm.create_model``).
    """
    if not isinstance(model, (str, nn.Module)):
        raise TypeError(f"create_spark takes a registered model's name or an encoder module, got {type(model).__name__}")
    name = None if isinstance(model, nn.Module) else resolve_model_name(model)
    if name is not None:
        _check_model_kwargs(model_kwargs)
    backend_obj = create_backend(backend, strict=strict_backend) if isinstance(backend, str) else backend
    if name is None:
        encoder = _built_encoder(model, drop_path_rate, model_kwargs)
    else:
        encoder = create_encoder(name, drop_path_rate=drop_path_rate, **model_kwargs)
    return SparK(encoder, backend_obj, input_size=input_size, mask_ratio=mask_ratio, sync_bn=sync_bn,
                 decoder_width=decoder_width)
