"""The active mask: which patches of each image the encoder sees.

SparK hides a random subset of the ``downsample_ratio``-sized patches of every image. Every layer of
the encoder needs that information at its own resolution; SparK kept it in a module-level global.
Here it is an explicit object created once per batch and handed down: it derives the dense mask,
the active coordinates and the neighbour index tables at any stride and caches them, so every layer
of one forward pass shares the same tables.
"""
from __future__ import annotations

from typing import Optional

import torch

from .errors import ConfigError

__all__ = ["ActiveMask", "kept_patches_per_image"]


def kept_patches_per_image(num_patches: int, mask_ratio: float) -> int:
    """SparK's ``len_keep = round(h * w * (1 - mask_ratio))``, refusing ratios that hide everything, or that
    hide something but round to keeping every patch (nothing to reconstruct: a loss of 0 and no gradient)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ConfigError(f"mask ratio must be in [0, 1), got {mask_ratio}")
    keep = round(num_patches * (1.0 - mask_ratio))
    if keep < 1:
        raise ConfigError(
            f"mask ratio {mask_ratio} keeps round({num_patches} * {1 - mask_ratio:.4g}) = 0 of "
            f"{num_patches} patches visible; lower the ratio or use a larger input"
        )
    if mask_ratio > 0 and keep == num_patches:
        raise ConfigError(
            f"mask ratio {mask_ratio} keeps round({num_patches} * {1 - mask_ratio:.4g}) = all {num_patches} patches "
            f"visible, so nothing is left to reconstruct; raise the ratio (SparK: 0.6) or use a larger input"
        )
    return keep


class ActiveMask:
    """Visible patches of a batch, ``(B, 1, h, w)`` bool at the coarsest grid (one cell per patch).

    ``stride`` arguments are in input pixels: stride 1 is the image, stride ``downsample_ratio`` is
    the patch grid. Everything derived is cached on the instance (not globally), so build one mask
    per batch and pass it to every consumer.
    """

    def __init__(self, active: torch.Tensor, downsample_ratio: int = 32):
        if active.dim() == 3:
            active = active.unsqueeze(1)
        if active.dim() != 4 or active.shape[1] != 1:
            raise ValueError(f"active mask must have shape (B, 1, h, w), got {tuple(active.shape)}")
        self.active = active.bool().contiguous()     # views (a transposed mask) reshape as the loss needs
        self.downsample_ratio = int(downsample_ratio)
        self._cache: dict = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def random(
        cls,
        batch_size: int,
        grid_hw: tuple[int, int],
        mask_ratio: float,
        downsample_ratio: int = 32,
        generator: Optional[torch.Generator] = None,
        device: torch.device | str | None = None,
    ) -> "ActiveMask":
        """SparK's random mask: per image, ``len_keep`` patches chosen uniformly without replacement.

        The random numbers are drawn on the CPU (as SparK does), so a CPU ``generator`` reproduces
        the same masks whatever device the mask is moved to.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"a mask is drawn for a batch of at least 1 image, got batch_size={batch_size!r}")
        h, w = grid_hw
        keep = kept_patches_per_image(h * w, mask_ratio)
        order = torch.rand(batch_size, h * w, generator=generator).argsort(dim=1)
        active = torch.zeros(batch_size, h * w, dtype=torch.bool)
        active.scatter_(1, order[:, :keep], True)
        return cls(active.view(batch_size, 1, h, w).to(device), downsample_ratio)

    @classmethod
    def full(cls, batch_size: int, grid_hw: tuple[int, int], downsample_ratio: int = 32,
             device: torch.device | str | None = None) -> "ActiveMask":
        """Every patch visible: the masked encoder then equals the plain dense one."""
        return cls(torch.ones(batch_size, 1, *grid_hw, dtype=torch.bool, device=device), downsample_ratio)

    # ------------------------------------------------------------------ basic properties
    @property
    def batch_size(self) -> int:
        return self.active.shape[0]

    @property
    def grid_hw(self) -> tuple[int, int]:
        return tuple(self.active.shape[-2:])

    @property
    def device(self) -> torch.device:
        return self.active.device

    def image_hw(self) -> tuple[int, int]:
        h, w = self.grid_hw
        return h * self.downsample_ratio, w * self.downsample_ratio

    def to(self, device) -> "ActiveMask":
        return self if self.active.device == torch.device(device) else ActiveMask(self.active.to(device), self.downsample_ratio)

    def check_matches(self, images: torch.Tensor) -> None:
        """Raise a clear error unless this mask fits ``images`` ``(B, C, H, W)``."""
        want = (images.shape[0], 1, images.shape[-2] // self.downsample_ratio, images.shape[-1] // self.downsample_ratio)
        if tuple(self.active.shape) != want:
            raise ValueError(
                f"active mask has shape {tuple(self.active.shape)} but images of shape {tuple(images.shape)} "
                f"with patch size {self.downsample_ratio} need {want}"
            )
        if not bool(self.active.flatten(1).any(1).all()):
            raise ValueError("every image needs at least one visible patch; the active mask hides all of some image")

    # ------------------------------------------------------------------ derived, cached
    def cached(self, key, build):
        """Per-mask cache shared by every layer of one forward pass (kernels store their tables here)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def _factor(self, stride: int) -> int:
        if stride < 1 or self.downsample_ratio % stride:
            raise ValueError(f"stride {stride} must divide the downsample ratio {self.downsample_ratio}")
        return self.downsample_ratio // stride

    def dense_at(self, stride: int) -> torch.Tensor:
        """``(B, 1, H / stride, W / stride)`` bool: the mask upsampled to a feature map of that stride."""
        def build():
            f = self._factor(stride)
            return self.active.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)
        return self.cached(("dense", stride), build)

    def map_hw(self, stride: int) -> tuple[int, int]:
        """``(H / stride, W / stride)``: the height and width of a feature map at that stride."""
        factor = self._factor(stride)
        return self.grid_hw[0] * factor, self.grid_hw[1] * factor

    def dense_like(self, x: torch.Tensor) -> torch.Tensor:
        """The mask at the resolution of ``x`` ``(B, C, H', W')`` (stride inferred from its height)."""
        return self.dense_at(self.stride_of(x.shape[-2]))

    def stride_of(self, height: int) -> int:
        h = self.grid_hw[0]
        if height % h:
            raise ValueError(f"feature height {height} is not a multiple of the mask grid height {h}")
        factor = height // h
        if self.downsample_ratio % factor:
            raise ValueError(f"feature height {height} does not correspond to a stride dividing {self.downsample_ratio}")
        return self.downsample_ratio // factor

    def coords_at(self, stride: int) -> torch.Tensor:
        """``[N, 3]`` long ``(b, y, x)`` of the active sites at ``stride``, in row-major order.

        This order defines the rows of every sparse feature matrix ``[N, C]`` at that stride.
        """
        return self.cached(("coords", stride), lambda: self.dense_at(stride)[:, 0].nonzero().contiguous())

    def flat_index(self, stride: int) -> torch.Tensor:
        """``[N]`` long: each active site's index ``(b * H + y) * W + x`` in a map at ``stride`` flattened to
        ``[B * H * W]`` rows, in the row order of :meth:`coords_at` (for ``index_put`` / ``index_select``
        between rows and a dense map: unlike boolean indexing's, their backwards are a plain gather and a
        scatter-add)."""
        def build():
            height, width = self.map_hw(stride)
            b, y, x = self.coords_at(stride).unbind(1)
            return (b * height + y) * width + x
        return self.cached(("flat-index", stride), build)

    def num_active(self, stride: int) -> int:
        return self.coords_at(stride).shape[0]

    def index_grid(self, stride: int) -> torch.Tensor:
        """``(B, H/stride, W/stride)`` long: row of each active site in ``coords_at(stride)``, ``N`` elsewhere.

        ``N`` (one past the last row) addresses an all-zero row appended to a feature matrix, so a
        gather through this grid reads zeros at masked sites, which is what SparK's dense conv sees.
        """
        def build():
            dense = self.dense_at(stride)[:, 0]
            n = self.num_active(stride)
            grid = torch.full(dense.shape, n, dtype=torch.long, device=dense.device)
            grid[dense] = torch.arange(n, device=dense.device)
            return grid
        return self.cached(("grid", stride), build)

    def neighbour_table(self, in_stride: int, out_stride: int, kernel_size: tuple[int, int],
                        padding: tuple[int, int], dilation: tuple[int, int],
                        padding_mode: str = "zeros") -> torch.Tensor:
        """``[N_out, kh * kw]`` long: for each active output site, the input row under each kernel tap.

        Taps over masked sites point at the zero row ``N_in``; taps over the zero padding of the
        dense convolution point at ``N_in + 1`` (a second extra row, so pooling can tell padding
        (never selected by max-pool) from masked sites (zeros in SparK's dense tensor)).
        With ``padding_mode="reflect"`` (``F.pad``'s, padding smaller than the map) a tap outside the
        map reads the site mirrored at the border instead: its row, or ``N_in`` if that site is masked.
        Taps are in row-major ``(ky, kx)`` order, matching a dense weight ``[O, C, kh, kw]``.
        """
        if padding_mode not in ("zeros", "reflect"):
            raise ValueError(f"padding_mode {padding_mode!r}: the neighbour tables know 'zeros' and 'reflect'")
        key = ("nbr", in_stride, out_stride, tuple(kernel_size), tuple(padding), tuple(dilation),
               padding_mode)

        def build():
            grid = self.index_grid(in_stride)
            n_in = self.num_active(in_stride)
            coords = self.coords_at(out_stride)
            step = out_stride // in_stride
            kh, kw = kernel_size
            ph, pw = padding
            dh, dw = dilation
            dev = grid.device
            ky = torch.arange(kh, device=dev) * dh
            kx = torch.arange(kw, device=dev) * dw
            ys = coords[:, 1:2] * step - ph + ky.repeat_interleave(kw)[None]   # [N_out, K]
            xs = coords[:, 2:3] * step - pw + kx.repeat(kh)[None]
            H, W = grid.shape[-2:]
            if padding_mode == "reflect":
                ys = torch.where(ys < 0, -ys, torch.where(ys >= H, 2 * (H - 1) - ys, ys))
                xs = torch.where(xs < 0, -xs, torch.where(xs >= W, 2 * (W - 1) - xs, xs))
            inside = (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
            b = coords[:, 0:1].expand_as(ys)
            table = grid[b, ys.clamp(0, H - 1), xs.clamp(0, W - 1)]
            return torch.where(inside, table, torch.full_like(table, n_in + 1)).contiguous()
        return self.cached(key, build)

    def __repr__(self) -> str:
        visible = self.active.flatten(1).sum(1).tolist()
        return f"ActiveMask(batch={self.batch_size}, grid={self.grid_hw}, patch={self.downsample_ratio}, visible={visible})"
