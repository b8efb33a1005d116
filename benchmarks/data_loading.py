#!/usr/bin/env python
"""What the data side of a step costs: loader workers' images/s, and the memory each worker copies.

    python benchmarks/data_loading.py --out benchmarks/results/cpu_data_loading
    python benchmarks/data_loading.py --quick          # tiny sizes, to check that it runs

Two sections:

1. ``loader``: images/s of ``spark-pretrain``'s own loader (``ImageFolderDataset`` with SparK's
   augmentation at ``--input-size``, the engine's ``EpochBatchSampler``, persistent workers) for each
   worker count in ``--workers`` (0: loading in the main process), median of ``--repeats`` epochs after
   one warm-up epoch, over ``--images`` synthetic JPEGs of ImageNet's typical pixel size (400-500 x
   300-375 px, quality 90, smooth content plus noise; their mean file size is reported). Both what
   the workers return now (uint8, normalised on the device by ``ImageNormalizer``) and what SparK's
   return (float32, ToTensor and Normalize in the worker). Also one process, one thread: JPEG decoding alone, and
   each pipeline per image; and ``ImageNormalizer`` on this CPU. A GPU that steps faster than its
   process's workers deliver waits for data: SparK runs 8 workers per GPU (``--dataloader_workers``).
2. ``memory``: the private memory a forked worker gains by reading every file name once, as it does
   over an epoch, for a list of ``Path`` (what the loader held before) and for ``PackedPaths``, at
   ImageNet-1k's 1,281,167 names (synthetic; nothing read from disk). Linux only.

Writes ``OUT/reference.json`` for ``render_benchmarks.py``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from spark_sparse.train.data import (IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset, ImageNormalizer,  # noqa: E402
                                     PackedPaths, pretrain_augmentation)
from spark_sparse.train.distributed import EpochBatchSampler  # noqa: E402
from _args import HelpFormatter, at_least, first_problem, input_size  # noqa: E402
from _report import run_reference_sections  # noqa: E402

IMAGENET_TRAIN_FILES = 1_281_167
IMAGENET_CLASSES = 1000


# ------------------------------------------------------------------------------------------- loader
def write_jpegs(folder: Path, count: int, seed: int = 0) -> float:
    """``count`` JPEGs in ``folder/train/class<k>/`` of ImageNet's typical size; returns their mean KB."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(count):
        width, height = int(rng.integers(400, 501)), int(rng.integers(300, 376))
        coarse = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
        pixels = (smooth + rng.normal(0, 16, smooth.shape)).clip(0, 255).astype(np.uint8)
        path = folder / "train" / f"class{i % 10}" / f"img{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
        total += path.stat().st_size
    return total / count / 1024


def loader_images_per_s(dataset: ImageFolderDataset, workers: int, batch: int, repeats: int) -> float:
    """Images/s of the engine's loader set-up over whole epochs (median of ``repeats`` after one warm-up)."""
    sampler = EpochBatchSampler(len(dataset), batch, seed=0, rank=0, world=1)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, persistent_workers=workers > 0)
    seconds = []
    for epoch in range(repeats + 1):
        sampler.set_epoch(epoch)
        started = time.perf_counter()
        images = sum(len(batch_images) for batch_images, _ in loader)
        if epoch:
            seconds.append(time.perf_counter() - started)
    del loader
    return images / statistics.median(seconds)


def in_process_images_per_s(fn, count: int, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        for index in range(count):
            fn(index)
        times.append(time.perf_counter() - started)
    return count / statistics.median(times[1:])


def sparks_worker_transform(input_size: int):
    """What SparK's loader workers return (and ours did): the augmentation, then ToTensor and Normalize."""
    from torchvision import transforms
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.67, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def loader_section(args) -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory(prefix="spark-loader-") as folder:
        mean_kb = write_jpegs(Path(folder), args.images)
        pipelines = {"uint8": pretrain_augmentation(args.input_size),
                     "float32": sparks_worker_transform(args.input_size)}
        datasets = {name: ImageFolderDataset(folder, transform) for name, transform in pipelines.items()}
        torch.set_num_threads(1)                 # what a loader worker runs with
        decode = in_process_images_per_s(datasets["uint8"].load, args.images, args.repeats)
        per_thread = {name: in_process_images_per_s(lambda i, d=dataset: d[(i, i)], args.images, args.repeats)
                      for name, dataset in datasets.items()}
        torch.set_num_threads(args.threads)
        batch = torch.stack([datasets["uint8"][(i, i)][0] for i in range(args.batch_size)])
        normalize = ImageNormalizer()
        normalize_rate = in_process_images_per_s(lambda i: normalize(batch), 1, args.repeats) * args.batch_size
        rows = [["in process, 1 thread: JPEG decode only", f"{decode:.0f}", "-"],
                ["in process, 1 thread: decode, crop, flip (uint8: a worker's part now)", f"{per_thread['uint8']:.0f}",
                 "-"],
                ["in process, 1 thread: the same + ToTensor + Normalize (float32: SparK's worker)",
                 f"{per_thread['float32']:.0f}", "-"],
                [f"ImageNormalizer on this CPU, batch {args.batch_size}, {args.threads} threads (main process)",
                 f"{normalize_rate:.0f}", "-"]]
        values = {"mean_file_kb": mean_kb, "decode_images_per_s": decode,
                  "augment_uint8_images_per_s": per_thread["uint8"], "augment_float32_images_per_s": per_thread["float32"],
                  "normalizer_images_per_s": normalize_rate}
        for workers in args.workers:
            loading = (f"{workers} worker{'s' if workers != 1 else ''}" if workers else
                       f"0 workers (loading in the main process, {args.threads} torch threads)")
            for name, dataset in datasets.items():
                rate = loader_images_per_s(dataset, workers, args.batch_size, args.repeats)
                rows.append([f"DataLoader, {loading}, {name} batches", f"{rate:.0f}",
                             f"{rate / workers:.0f}" if workers else "-"])
                values[f"workers_{workers}_{name}_images_per_s"] = rate
                print(f"[data] {loading}, {name}: {rate:.0f} images/s", flush=True)
    title = (f"Loader images/s, SparK's augmentation at {args.input_size} px, {args.images} synthetic JPEGs "
             f"of {mean_kb:.0f} KB on average, batch {args.batch_size}")
    return {"title": title, "columns": ["what", "images/s", "per worker"], "rows": rows}, values


# ------------------------------------------------------------------------------------------- memory
def private_dirty_mb() -> float:
    with open("/proc/self/smaps_rollup") as smaps:
        for line in smaps:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no Private_Dirty line in /proc/self/smaps_rollup")


def synthetic_names(count: int) -> list[str]:
    """ImageNet's layout: ``n<wnid>/n<wnid>_<i>.JPEG``, spread over 1000 class folders."""
    return [f"n{i % IMAGENET_CLASSES:08d}/n{i % IMAGENET_CLASSES:08d}_{i}.JPEG" for i in range(count)]


def worker_growth_mb(files) -> float:
    """Private memory a forked child gains by reading ``files[i]`` for every ``i``, as a loader worker does."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        before = private_dirty_mb()
        for index in range(len(files)):
            str(files[index])
        os.write(write_end, f"{private_dirty_mb() - before:.1f}".encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        grown = float(pipe.read())
    os.waitpid(pid, 0)
    return grown


def memory_section(args) -> tuple[dict, dict]:
    root = Path("/datasets/imagenet/train")
    names = synthetic_names(args.names)
    containers = {"list of Path (before)": lambda: [root / name for name in names],
                  "PackedPaths": lambda: PackedPaths(root, names)}
    rows, values = [], {}
    for label, build in containers.items():
        files = build()
        grown = worker_growth_mb(files)
        del files
        rows.append([label, f"{grown:.0f}"])
        values["path_list_mb" if label.startswith("list") else "packed_mb"] = grown
        print(f"[data] {label}: a worker gains {grown:.0f} MB", flush=True)
    title = f"Private memory one forked worker gains reading {args.names:,} file names once"
    return {"title": title, "columns": ["file list", "MB"], "rows": rows}, values


SECTIONS = {"loader": loader_section, "memory": memory_section}
#: what --quick sets, unless given on the command line
QUICK_PRESET = {"images": 16, "batch_size": 4, "names": 20_000, "repeats": 1, "workers": [1]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), help="what to measure")
    p.add_argument("--images", type=int, default=512, help="synthetic JPEGs for the loader section")
    p.add_argument("--input-size", type=int, default=224, help="crop side in pixels (multiple of 32)")
    p.add_argument("--batch-size", type=int, default=32, help="images per loader batch")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="loader worker counts, 0: loading in the main process (default: 1 up to this machine's CPUs, "
                        "doubling)")
    p.add_argument("--names", type=int, default=IMAGENET_TRAIN_FILES, help="file names for the memory section")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs (and in-process passes) after one warm-up")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the main process")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, to check that it runs (measures nothing useful): " + " ".join(
                       f"--{key.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                       for key, v in QUICK_PRESET.items()) + " (options given explicitly win)")
    p.add_argument("--out", type=Path, default=Path("bench_out/data_loading"),
                   help="folder for reference.json (its path is printed at the end)")
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(**QUICK_PRESET)      # as defaults, so that e.g. --quick --workers 0 1 keeps 0 1
    args = p.parse_args(argv)
    problem = first_problem([
        at_least("--images", args.images, 1), input_size("--input-size", args.input_size),
        at_least("--batch-size", args.batch_size, 1),
        *[("--workers", n, n >= 0, "0 (loading in the main process) or more") for n in args.workers or []],
        at_least("--names", args.names, 1), at_least("--repeats", args.repeats, 1),
        at_least("--threads", args.threads, 1)])
    if problem:
        p.error(problem)
    if args.workers is None:
        cpus = len(os.sched_getaffinity(0))
        args.workers = [1 << i for i in range(cpus.bit_length()) if 1 << i <= cpus]
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    return run_reference_sections(SECTIONS, args, __file__, argv, tag="data")


if __name__ == "__main__":
    main()
