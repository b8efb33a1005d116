"""Images for pre-training: an image folder or the embedded demo photos, SparK's augmentation.

Every sample is drawn with its own seed (see :func:`~.distributed.epoch_batches`), so an epoch's
batches are a pure function of (seed, epoch) whatever the number of loader workers, which makes
resuming exact. Unreadable files never stop an epoch: they are replaced by the next readable image
and reported by name.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from ..errors import SparkSparseError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "DataError", "pretrain_augmentation", "ImageNormalizer",
           "ImageFolderDataset", "DemoPhotosDataset", "ImageListing", "PackedPaths", "find_images", "describe_hidden",
           "denormalize", "to_rgb"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(SparkSparseError, ValueError):
    pass


def pretrain_augmentation(input_size: int | tuple[int, int]) -> Callable:
    """SparK's augmentation, RandomResizedCrop(scale 0.67-1, bicubic) and flip, to a uint8 ``[3, H, W]``
    tensor; :class:`ImageNormalizer` finishes SparK's transform (ToTensor, ImageNet normalisation) once
    the batch is on its device."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.67, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.PILToTensor(),
    ])


class ImageNormalizer:
    """uint8 images -> SparK's inputs: bit for bit what torchvision's ToTensor + Normalize give, on any device.

    Why not in the loader workers, as SparK does: float32 batches are four times the bytes of uint8
    ones to pass from the workers, pin and copy to the GPU, and ToTensor + Normalize add a few
    percent to a worker's time per image; a worker delivers about 30% more images/s without them
    (``benchmarks/data_loading.py``). Why a table: the result depends only on (channel, value),
    so torchvision's own functions compute all 3 x 256 values once on the CPU, and normalising a
    batch is a lookup. The same arithmetic on a GPU could round differently (CUDA divides by a
    scalar through its reciprocal); a lookup is exact everywhere, so a run's inputs stay SparK's.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        every_value = np.repeat(np.arange(256, dtype=np.uint8).reshape(1, 256, 1), 3, axis=2)   # an HWC image
        self.table = transforms.Normalize(mean, std)(transforms.functional.to_tensor(every_value)).reshape(3, 256)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` uint8 -> float32 of the same shape, on ``images``' device."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images of shape [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if images.device not in self._on_device:     # the flat table and each channel's offset into it
            self._on_device[images.device] = (
                self.table.reshape(-1).to(images.device),
                torch.arange(0, 3 * 256, 256, dtype=torch.int32, device=images.device).view(1, 3, 1, 1))
        flat_table, channel_offsets = self._on_device[images.device]
        return flat_table[images.int() + channel_offsets]


def denormalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


class PackedPaths(Sequence[Path]):
    """File paths below one folder, packed into two numpy arrays instead of a list of Python objects.

    Why: every loader worker is a forked copy of its training process, and merely reading a Python
    object writes its reference count, which copies the memory page it sits on. Over an epoch each
    worker reads every entry of the file list, so a list of ImageNet's 1.28 M ``Path`` objects (about
    0.4 GB) ends up copied into each of a process's workers (PyTorch issue 13246): gigabytes per
    GPU process. Arrays hold no reference counts and stay shared; where workers are spawned instead
    of forked, they are pickled as two buffers rather than a million objects.
    """

    def __init__(self, root: Path, relative_names: Sequence[str]):
        encoded = [os.fsencode(name) for name in relative_names]
        self.root = root
        self._bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._ends = np.cumsum([len(name) for name in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> Path:   # type: ignore[override]  (no slices)
        if not -len(self) <= index < len(self):
            raise IndexError(f"file index {index} out of range for {len(self)} files")
        index %= len(self)
        start = int(self._ends[index - 1]) if index else 0
        return self.root / os.fsdecode(self._bytes[start:int(self._ends[index])].tobytes())

    def digest(self) -> str:
        """Of the relative names in order (a fraction of a second for ImageNet's 1.28 M)."""
        hashed = hashlib.sha256(self._bytes.tobytes())
        hashed.update(self._ends.tobytes())
        return hashed.hexdigest()[:16]


class ImageListing(NamedTuple):
    """What :func:`find_images` found: the folder read, its image files, the folders below it that
    could not be listed (``"<folder>: <error>"``), whose images are left out, how many hidden files
    with image names were left out, and the hidden folders left out unread (paths relative to ``root``)."""

    root: Path
    files: PackedPaths
    unlisted: list[str]
    hidden: int = 0
    hidden_folders: tuple[str, ...] = ()


def describe_hidden(files: int, folders: Sequence[str], named: int = 3) -> str:
    """What hidden entries were left out, for the data line and errors; '' when none.

    The folders are counted, not walked (a ``.git`` or ``.cache`` folder may hold millions of files), and the
    first ``named`` are named, so a user who put images in one on purpose sees where they went.
    """
    parts = []
    if files:
        parts.append(f"{files} hidden file with an image name" if files == 1 else
                     f"{files} hidden files with image names")
    if folders:
        shown = ", ".join(folders[:named]) + (f" and {len(folders) - named} more" if len(folders) > named else "")
        parts.append(f"{len(folders)} hidden folder{'s' if len(folders) != 1 else ''} ({shown})")
    return f"{' and '.join(parts)} left out: names starting with '.'" if parts else ""


def find_images(data_path: str | Path) -> ImageListing:
    """``<data_path>/train`` if it exists, else ``data_path``; every image file below it, sorted.

    Symlinked folders are followed, as torchvision's ``ImageFolder`` (SparK's loader) does: datasets
    are often assembled from links to class folders, and ``Path.rglob`` before Python 3.13 skips
    them without a word, which would train on part of the data. Each real folder is listed once,
    so a link cycle ends. File types come from the directory listing (no ``stat`` per file, which
    costs minutes for ImageNet on a network file system); a broken link is kept and then reported
    as unreadable by name, rather than dropped unseen. Folders that cannot be listed (permissions)
    are returned for the caller to report. Hidden files and folders (names starting with ``.``) are left
    out and counted: macOS's ``._photo.jpg`` resource forks are not images, and a ``.ipynb_checkpoints``
    folder holds copies. Hidden folders are not entered (a ``.git`` may hold millions of files), so their
    own images are not counted; their paths are returned for the caller to name. The order is ``Path``'s
    (folder by folder, part by part), so a file keeps its index, and a run its data order, across versions
    of this function.

    Raises :class:`DataError` before anything starts when the folder is missing or holds no image.
    """
    root = Path(data_path).expanduser()
    if not root.exists():
        raise DataError(f"--data_path {str(root)!r} does not exist (expected an image folder, optionally with a "
                        f"'train' sub-folder and class sub-folders)")
    if not root.is_dir():
        raise DataError(f"--data_path {str(root)!r} is not a folder (expected an image folder, optionally with a "
                        f"'train' sub-folder and class sub-folders)")
    if (root / "train").is_dir():
        root = root / "train"
    names: list[str] = []
    unlisted: list[str] = []
    listed: set[str] = set()
    hidden = 0
    hidden_folders: list[str] = []
    for folder, subfolders, files in os.walk(root, followlinks=True,
                                             onerror=lambda err: unlisted.append(f"{err.filename}: {err.strerror}")):
        real = os.path.realpath(folder)
        if real in listed:
            subfolders.clear()
            continue
        listed.add(real)
        # a folder reached by two names is listed under the first, every run
        prefix = os.path.relpath(folder, root)
        prefix = "" if prefix == os.curdir else prefix + os.sep
        hidden_folders.extend(prefix + name for name in sorted(subfolders) if name.startswith("."))
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        images = [name for name in files if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]
        names.extend(prefix + name for name in images if not name.startswith("."))
        hidden += sum(name.startswith(".") for name in images)
    if not names:
        could_not = f"; could not list {'; '.join(unlisted[:3])}" if unlisted else ""
        left_out = describe_hidden(hidden, hidden_folders)
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {str(root)!r}{could_not}"
                        f"{'; ' + left_out if left_out else ''}")
    names.sort(key=lambda name: name.split(os.sep))
    return ImageListing(root, PackedPaths(root, names), unlisted, hidden, tuple(hidden_folders))


class _SeededDataset(Dataset):
    """Base: ``dataset[(index, seed)]`` applies the transform under that seed.

    Returns ``(image, index of an unreadable file that was replaced, or -1)``.
    """

    #: folders whose images are left out because they could not be listed (``"<folder>: <error>"``)
    unlisted_folders: Sequence[str] = ()
    #: hidden files with image names left out (``._photo.jpg`` and the like)
    hidden_files: int = 0
    #: hidden folders left out unread (``.ipynb_checkpoints`` and the like), relative to the data folder
    hidden_folders: Sequence[str] = ()

    def __init__(self, transform: Callable):
        self.transform = transform

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return str(index)

    def listing_digest(self) -> str:
        """A digest of what each index holds, independent of where the data folder lives."""
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """``{"images": count, "listing": digest}``: kept in checkpoints, so that a resume on data that changed
        meanwhile (another epoch length, another image at an index) is told, not run as if it were the same."""
        return {"images": len(self), "listing": self.listing_digest()}

    def hidden_note(self) -> str:
        """The hidden files and folders left out, for the run's data line ('' when none)."""
        return describe_hidden(self.hidden_files, self.hidden_folders)

    def why_unreadable(self, index: int) -> str:
        """The error reading ``index`` gives (the loader workers only report which index failed)."""
        try:
            self.load(index)
        except Exception as err:
            return f"{type(err).__name__}: {err}"
        return "readable now"

    def check_readable(self, samples: int = 16) -> None:
        """Decode up to ``samples`` images spread evenly over the dataset; raise :class:`DataError` if none reads.

        Unreadable files are otherwise replaced one by one during the epochs, which is right for a few bad
        files but, for a folder of nothing readable (files of another format under image names, an
        unmounted network share of empty stubs), would fail only after the model is built and the run's
        first files are written. A folder where some sampled images read is left to that per-file path.
        """
        count = min(samples, len(self))
        indices = sorted({round(i * (len(self) - 1) / max(count - 1, 1)) for i in range(count)})
        first_error = None
        for index in indices:
            try:
                self.load(index)
                return
            except Exception as err:   # any decoding failure: what matters is whether some image reads
                first_error = first_error or (index, err)
        index, err = first_error
        raise DataError(f"none of {len(indices)} images sampled across the {len(self)} files could be read, e.g. "
                        f"{self.describe(index)} ({type(err).__name__}: {err}); check that --data_path holds "
                        f"images that PIL can open")

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        bad, first_error = -1, None
        for attempt in range(len(self)):
            candidate = (index + attempt) % len(self)
            try:
                image = self.load(candidate)
                break
            except Exception as err:   # any decoding failure of one file must not stop the epoch
                if bad < 0:
                    bad, first_error = candidate, err
        else:
            raise DataError(f"none of the {len(self)} images could be read, e.g. {self.describe(index)} "
                            f"({type(first_error).__name__}: {first_error})")
        with torch.random.fork_rng(devices=[]):   # torchvision's random transforms draw from torch's RNG
            torch.manual_seed(seed)
            return self.transform(image), bad


class ImageFolderDataset(_SeededDataset):
    def __init__(self, data_path: str | Path, transform: Callable):
        super().__init__(transform)
        self.root, self.files, self.unlisted_folders, self.hidden_files, self.hidden_folders = find_images(data_path)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Image.Image:
        with Image.open(self.files[index]) as img:
            return to_rgb(img)

    def describe(self, index: int) -> str:
        return str(self.files[index])

    def listing_digest(self) -> str:
        return self.files.digest()


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB, as torchvision's loader gives it, except for images of more than 8 bits per sample.

    Pillow's ``convert("RGB")`` clips a 16-bit greyscale image at 255 (nearly every pixel white, with no
    error); here its samples are scaled to 8 bits over the whole 16-bit range, as Pillow itself reads a
    16-bit colour PNG. 32-bit integer and float images have no agreed range to scale from: refused with
    the reason (the file is then reported and replaced like any unreadable one).
    """
    sixteen_bit = img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG")   # PNG's 'I' is 16-bit
    if sixteen_bit:
        samples = np.asarray(img).astype(np.uint32)
        return Image.fromarray(((samples * 255 + 32767) // 65535).astype(np.uint8), mode="L").convert("RGB")
    if img.mode in ("I", "F"):
        raise DataError(f"{img.mode!r} images ({'32-bit integer' if img.mode == 'I' else 'floating-point'} "
                        f"samples) have no agreed 8-bit range: convert them to 8- or 16-bit images first")
    return img.convert("RGB")


#: colour photos shipped inside scikit-image (no download)
DEMO_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
               "colorwheel")


class DemoPhotosDataset(_SeededDataset):
    """The embedded default: scikit-image's sample photos, each cut into many random views.

    ``views_per_photo`` virtual samples per photo; the random resized crop and flip of each sample
    make them different views.
    """

    def __init__(self, transform: Callable, views_per_photo: int = 64, photos: Sequence[str] = DEMO_PHOTOS,
                 max_side: int = 320):
        super().__init__(transform)
        import skimage.data

        self.photos = []
        for name in photos:
            try:
                array = getattr(skimage.data, name)()
            except Exception:   # some skimage versions need a download for a few photos: skip them
                continue
            if array.ndim == 3 and array.shape[2] >= 3:
                photo = Image.fromarray(np.ascontiguousarray(array[..., :3]))
                photo.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)   # cheap crops, same content
                self.photos.append((name, photo))
        if not self.photos:
            raise DataError("scikit-image ships none of the demo photos; pass --data_path")
        self.views_per_photo = views_per_photo

    def __len__(self) -> int:
        return len(self.photos) * self.views_per_photo

    def load(self, index: int) -> Image.Image:
        return self.photos[index % len(self.photos)][1]

    def describe(self, index: int) -> str:
        return f"skimage.data.{self.photos[index % len(self.photos)][0]}"

    def listing_digest(self) -> str:
        names = "\n".join(name for name, _ in self.photos) + f"\n{self.views_per_photo} views"
        return hashlib.sha256(names.encode()).hexdigest()[:16]
