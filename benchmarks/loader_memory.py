"""What a forked data-loader worker copies of the image list: a list of ``Path`` against ``PackedPaths``.

A loader worker is a forked copy of its training process. Reading a Python object writes its reference
count, which makes the kernel copy the page it sits on, so a worker that reads every file name of an
epoch ends up with a private copy of a list of Python objects (PyTorch issue 13246). This forks one
worker per container, reads every name once as the dataset's ``load`` does, and prints how much private
(copied) memory the worker gained. The names are synthetic (ImageNet-1k's count and layout); nothing is
read from disk.

    python benchmarks/loader_memory.py                 # 1,281,167 names, ImageNet-1k's train split
    python benchmarks/loader_memory.py --files 100000

Linux only (``/proc/self/smaps_rollup``).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from spark_sparse.train.data import PackedPaths

IMAGENET_TRAIN_FILES = 1_281_167
IMAGENET_CLASSES = 1000


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=IMAGENET_TRAIN_FILES, help="how many file names")
    args = parser.parse_args()
    root = Path("/datasets/imagenet/train")
    names = synthetic_names(args.files)
    containers = {"list of Path (before)": lambda: [root / name for name in names],
                  "PackedPaths": lambda: PackedPaths(root, names)}
    print(f"{args.files} file names; private memory one forked worker gains reading each name once:")
    for label, build in containers.items():
        files = build()
        print(f"  {label:<24} {worker_growth_mb(files):8.0f} MB", flush=True)
        del files


if __name__ == "__main__":
    main()
