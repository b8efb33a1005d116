#!/usr/bin/env bash
# Prepare spconv's CUDA build for the GPU check, HERE (where PyPI is reachable), once per checkout.
#
# The GPU machine has no network and takes at most 64 MiB per call (working tree + carried paths).
# spconv has no CUDA 13 build; spconv-cu126 2.3.8 (cp312, manylinux_2_28) runs on CUDA 13 drivers
# (it bundles its own CUDA 12.6 runtime and does not link against torch). Its wheels are 93 MiB:
# spconv-cu126 67 MiB + cumm-cu126 0.7.11 (spconv asks for cumm-cu126 >=0.7.11,<0.8) 25 MiB + small
# pure-Python needs the GPU image lacks (pccm, ccimport, fire, lark, termcolor; pybind11, numpy,
# sympy, ninja, requests, portalocker are there). Zip-compressed wheels do not fit one call, so this
# script unpacks them (a wheel without .data folders IS its installed files) and packs the tree with
# xz: about 38 MiB, one call. gpu_check.sh unpacks .whl/*.site.tar.xz into a folder on PYTHONPATH.
#
# It also puts a setuptools wheel in .whl/build/: the project's pyproject.toml needs setuptools >= 77 (a
# PEP 639 license string) and nobody has read the GPU image's version; gpu_check.sh builds with the
# image's own first and, only if that fails, from this wheel in an isolated build environment.
#
#   bash benchmarks/gpu_wheels.sh              # writes .whl/spconv-cu126.site.tar.xz and .whl/build/ (.whl/ is git-ignored)
#   then the device call: command "bash benchmarks/gpu_check.sh", carry [".whl"] (README "GPU check")
#
# Checked here (Python 3.12, torch 2.11.0+cu130, no GPU): with the unpacked tree on PYTHONPATH,
# `import spconv.pytorch.ops` works; CUDA kernels can only be checked on the GPU machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
DEST=.whl
BUNDLE=$DEST/spconv-cu126.site.tar.xz
LIMIT_MIB=56          # what may travel besides the working tree (64 MiB in all per call)
PACKAGES=(spconv-cu126==2.3.8 cumm-cu126==0.7.11 pccm==0.4.16 ccimport==0.4.4 fire==0.7.1 lark==1.3.1
          termcolor==3.3.0)
BUILD_PACKAGES=(setuptools==84.2.1)   # pure Python; checked building this project in an isolated build

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$DEST" "$work/site"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$work/wheels" "${PACKAGES[@]}"
for wheel in "$work"/wheels/*.whl; do
    if "$PYTHON" -m zipfile -l "$wheel" | grep -q '\.data/'; then
        echo "$wheel has a .data folder: unpacking is not installing it; carry the wheel instead" >&2
        exit 1
    fi
    "$PYTHON" -m zipfile -e "$wheel" "$work/site"
done
echo "[gpu_wheels] packing $(du -sh "$work/site" | cut -f1) of unpacked wheels with xz -9 (a few minutes)"
tar -C "$work/site" -cf - . | xz -9 -T0 > "$BUNDLE.tmp"
mv "$BUNDLE.tmp" "$BUNDLE"
rm -rf "$DEST/build"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$DEST/build" "${BUILD_PACKAGES[@]}"
size_mib=$(( ( $(stat -c %s "$BUNDLE") + $(du -sb "$DEST/build" | cut -f1) ) / 1048576 ))
echo "[gpu_wheels] wrote $BUNDLE and $DEST/build/ (${BUILD_PACKAGES[*]}): $size_mib MiB (limit for the carried files: $LIMIT_MIB MiB)"
if (( size_mib > LIMIT_MIB )); then
    echo "[gpu_wheels] too large for one device call" >&2
    exit 1
fi
