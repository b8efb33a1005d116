"""The image data: listing a folder (what, in which order, held how for loader workers), and SparK's
transform split between the loader workers (uint8 augmentation) and the device (``ImageNormalizer``)."""
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from spark_sparse.train.data import (IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, DataError, ImageFolderDataset,
                                     ImageNormalizer, PackedPaths, describe_hidden, find_images, pretrain_augmentation,
                                     to_rgb)

from apptools import make_image_folder

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import data_loading  # noqa: E402


def test_symlinked_class_folders_are_read_as_torchvisions_imagefolder_reads_them(tmp_path):
    shared = make_image_folder(tmp_path / "shared", count=4)          # shared/train/class0, class1: 2 images each
    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    (data / "class0").symlink_to(shared / "train" / "class0", target_is_directory=True)
    (data / "same").symlink_to(shared / "train" / "class0", target_is_directory=True)   # listed once, first name
    (data / "class1").mkdir()
    (data / "class1" / "loop").symlink_to(data, target_is_directory=True)               # a cycle must end
    (data / "class1" / "flat.png").symlink_to(shared / "train" / "class1" / "img1.png")
    (data / "class1" / "gone.png").symlink_to(tmp_path / "deleted.png")                 # kept: read, then reported
    listing = find_images(tmp_path / "data")
    assert listing.root == data and listing.unlisted == []
    names = [str(p.relative_to(data)) for p in listing.files]
    assert names == ["class0/img0.png", "class0/img2.png", "class1/flat.png", "class1/gone.png"]


def test_files_keep_paths_order_so_a_run_keeps_its_data_order(tmp_path):
    """The order of the earlier ``sorted(Path, ...)`` listing, on names where string order differs from it."""
    root = tmp_path / "train"
    for name in ["a/b.jpg", "a-b/c.jpg", "a.b.jpg", "A/z.png", "\u00e4/x.png", "a/b/c/d.PNG", "b.jpg", "a b/x.jpg",
                 "a0/x.jpg", "notes.txt", "a/readme.md"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()
    with open(os.fsencode(root) + b"/\xff\xfe.jpg", "wb"):          # not UTF-8: kept and read back
        pass
    listing = find_images(tmp_path)
    path_order = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    assert list(listing.files) == path_order and len(path_order) == 10
    assert all(p.is_file() for p in listing.files)


def test_hidden_files_and_folders_are_left_out_and_counted(tmp_path):
    root = tmp_path / "train"
    for name in ["c/a.jpg", "c/._a.jpg", "c/.b.png", ".ipynb_checkpoints/a-checkpoint.jpg", "c/.notes.txt"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()
    listing = find_images(tmp_path)
    assert list(listing.files) == [root / "c" / "a.jpg"] and listing.hidden == 2
    assert listing.hidden_folders == (".ipynb_checkpoints",)


def test_hidden_folders_are_counted_and_named_not_entered(tmp_path, monkeypatch):
    """The user trial's folder: the data line named the hidden file but not the two hidden folders."""
    root = make_image_folder(tmp_path / "weird", count=4) / "train"          # class0, class1: 2 PNGs each
    for name in [".ipynb_checkpoints/a.png", "class0/.hid/b.png", "class0/._x.png", ".git/objects/c.png"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()
    walked = []
    real_scandir = os.scandir

    def scandir(path="."):
        walked.append(os.path.basename(os.fspath(path)))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    dataset = ImageFolderDataset(tmp_path / "weird", transform=lambda image: image)
    assert len(dataset) == 4 and dataset.hidden_files == 1
    assert dataset.hidden_folders == (".git", ".ipynb_checkpoints", os.path.join("class0", ".hid"))
    assert "class0" in walked and not {".git", "objects", ".ipynb_checkpoints", ".hid"} & set(walked)   # not entered
    assert dataset.hidden_note() == ("1 hidden file with an image name and 3 hidden folders (.git, .ipynb_checkpoints, "
                                     f"{os.path.join('class0', '.hid')}) left out: names starting with '.'")


def test_hidden_note_counts_in_words_and_names_a_few_folders():
    assert describe_hidden(0, []) == ""
    assert describe_hidden(2, []) == "2 hidden files with image names left out: names starting with '.'"
    assert describe_hidden(0, [".a", ".b", ".c", ".d", ".e"]) == \
        "5 hidden folders (.a, .b, .c and 2 more) left out: names starting with '.'"


def test_a_folder_whose_images_are_all_hidden_says_where_they_are(tmp_path):
    (tmp_path / ".photos").mkdir()
    (tmp_path / ".photos" / "a.png").touch()
    with pytest.raises(DataError, match=r"no image files .*; 1 hidden folder \(\.photos\) left out"):
        find_images(tmp_path)


def test_sixteen_bit_greyscale_is_scaled_to_eight_bits_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")                 # 'I;16' (Pillow 10+) or 'I'
        rgb = np.asarray(to_rgb(img))
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb[..., 0].astype(int) - np.round(ramp / 257)).max() <= 1        # convert("RGB"): all 255 but 1
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_floating_point_images_are_refused_with_the_reason(tmp_path):
    Image.fromarray(np.random.rand(16, 16).astype(np.float32)).save(tmp_path / "float.tif")
    with Image.open(tmp_path / "float.tif") as img, pytest.raises(DataError, match="no agreed 8-bit range"):
        to_rgb(img)


def test_packed_paths_index_like_a_list_and_pickle_as_two_arrays(tmp_path):
    names = [f"n{i % 7:08d}/n{i % 7:08d}_{i}.JPEG" for i in range(5000)]
    packed = PackedPaths(tmp_path, names)
    assert len(packed) == 5000 and packed[0] == tmp_path / names[0] and packed[-1] == tmp_path / names[-1]
    assert [packed[i] for i in (17, 4999)] == [tmp_path / names[17], tmp_path / names[4999]]
    for wrong in (5000, -5001):
        with pytest.raises(IndexError, match="out of range for 5000 files"):
            packed[wrong]
    # no object per file: the pickle is the names' bytes and one offset per file, plus a constant
    pickled = pickle.dumps(packed)
    assert len(pickled) < sum(map(len, names)) + 8 * len(names) + 1000
    assert list(pickle.loads(pickled)) == list(packed)


def test_a_forked_worker_reading_packed_paths_copies_far_less_than_a_list_of_paths():
    names = data_loading.synthetic_names(200_000)
    root = Path("/datasets/imagenet/train")
    as_list = data_loading.worker_growth_mb([root / name for name in names])
    packed = data_loading.worker_growth_mb(PackedPaths(root, names))
    assert as_list > 30 and packed < as_list / 4, (as_list, packed)


def test_the_data_loading_benchmark_writes_both_sections(tmp_path):
    path = data_loading.main(["--quick", "--out", str(tmp_path)])
    report = json.loads(path.read_text())
    assert [s["columns"] for s in report["sections"]] == [["what", "images/s", "per worker"], ["file list", "MB"]]
    loader, memory = report["values"]["loader"], report["values"]["memory"]
    assert loader["workers_1_uint8_images_per_s"] > 0 and loader["workers_1_float32_images_per_s"] > 0
    assert loader["decode_images_per_s"] > loader["augment_uint8_images_per_s"] > 0 and loader["normalizer_images_per_s"] > 0
    assert 20 < loader["mean_file_kb"] < 500 and set(memory) == {"path_list_mb", "packed_mb"}
    assert "--quick" in report["meta"]["command"]


def sparks_transform(input_size):
    """SparK's own worker transform, written out with torchvision (the reference)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.67, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@pytest.mark.parametrize("input_size", [64, 96])
def test_augmentation_then_normalizer_is_sparks_transform_bit_for_bit(input_size):
    rng = np.random.default_rng(0)
    normalize, ours, sparks = ImageNormalizer(), pretrain_augmentation(input_size), sparks_transform(input_size)
    images, expected = [], []
    for seed in range(12):
        image = Image.fromarray(rng.integers(0, 256, (70 + 7 * seed, 90, 3), dtype=np.uint8))
        torch.manual_seed(seed)
        expected.append(sparks(image))
        torch.manual_seed(seed)
        images.append(ours(image))
    assert all(image.dtype == torch.uint8 for image in images)
    got = normalize(torch.stack(images))
    assert got.dtype == torch.float32 and torch.equal(got, torch.stack(expected))


def test_normalizer_covers_every_value_and_refuses_what_is_not_a_uint8_batch():
    every = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16).contiguous()
    reference = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(every.float().div(255))
    assert torch.equal(ImageNormalizer()(every), reference)
    for wrong in (every.float(), every[0], every[:, :1]):
        with pytest.raises(ValueError, match=r"expected uint8 images of shape \[B, 3, H, W\]"):
            ImageNormalizer()(wrong)


def test_the_data_fingerprint_names_the_listing_not_where_the_folder_lives(tmp_path):
    import shutil

    first = make_image_folder(tmp_path / "first", count=3)
    moved = shutil.copytree(first, tmp_path / "elsewhere" / "first")
    fingerprint = ImageFolderDataset(first, lambda img: img).fingerprint()
    assert fingerprint["images"] == 3 and ImageFolderDataset(moved, lambda img: img).fingerprint() == fingerprint
    image = next(path for path in Path(moved).rglob("*") if path.is_file())
    image.rename(image.with_name("renamed" + image.suffix))
    renamed = ImageFolderDataset(moved, lambda img: img).fingerprint()
    assert renamed["images"] == 3 and renamed["listing"] != fingerprint["listing"]
