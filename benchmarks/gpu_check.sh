#!/usr/bin/env bash
# The one-shot GPU check of spark-sparse: on a fresh H100/H200 machine (Python 3.12, torch, Triton,
# timm, pytest; no network) it installs the project from this working tree (and the spconv CUDA
# build, if benchmarks/gpu_wheels.sh put it under .whl/), then runs benchmarks/gpu_check.py:
# environment, `pytest -m gpu`, the encoder table, the step table and the loader's images/s, each phase
# with its own deadline, under 8 minutes in all. Results: ONE folder $OUT/gpu_<card>/ (7 files).
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh                   # on the GPU machine
#   GPU_CHECK_SMOKE=1 OUT=/tmp/x bash benchmarks/gpu_check.sh       # the same driver on the CPU, tiny sizes
#
# The device-tool call (README "GPU check"): command `bash benchmarks/gpu_check.sh`, carry [".whl"],
# timeout_s 600. Environment: PYTHON (default python3), OUT (default ./gpu_check_out),
# GPU_CHECK_SMOKE=1 (CPU smoke run), GPU_CHECK_WHEELS=1 (install carried wheels in a smoke run too),
# GPU_CHECK_BUILD_WHEELS (where the fallback setuptools wheel is, default .whl/build).
set -uo pipefail
export PYTHONUNBUFFERED=1
export GPU_CHECK_T0=${GPU_CHECK_T0:-$(date +%s)}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
export OUT=${OUT:-$PWD/gpu_check_out}
SMOKE=${GPU_CHECK_SMOKE:-0}
SITE=${GPU_CHECK_SITE:-/tmp/spark_sparse_site}
notes=()
status=ok

# 1. carried wheels (benchmarks/gpu_wheels.sh): the unpacked-wheel bundle and/or plain wheels -> $SITE
if [[ $SMOKE != 1 || ${GPU_CHECK_WHEELS:-0} == 1 ]]; then
    shopt -s nullglob
    bundles=(.whl/*.site.tar.xz)
    wheels=(.whl/*.whl)
    if (( ${#bundles[@]} + ${#wheels[@]} )); then
        mkdir -p "$SITE"
        for bundle in "${bundles[@]}"; do
            echo "[gpu_check] unpacking $bundle into $SITE"
            # tarfile, not tar -J: no dependency on the xz program being installed
            if "$PYTHON" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
                    "$bundle" "$SITE"; then
                notes+=("unpacked $(basename "$bundle")")
            else
                status=failed; notes+=("could not unpack $(basename "$bundle")")
            fi
        done
        if (( ${#wheels[@]} )); then
            echo "[gpu_check] installing ${#wheels[@]} carried wheels into $SITE"
            if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                    --target "$SITE" "${wheels[@]}"; then
                notes+=("installed ${#wheels[@]} wheels")
            else
                status=failed; notes+=("pip could not install the carried wheels")
            fi
        fi
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        notes+=("no carried wheels (.whl/): spconv rows will say why they are missing")
    fi
fi

# 2. the project itself: kernels/ imports as spark_sparse.kernels only through the package-dir
#    mapping of pyproject.toml, so it must be installed (editable: the working tree is what runs).
#    It builds with the image's setuptools; pyproject.toml needs >= 77, so if that one is older the
#    install is retried in an isolated build environment from the setuptools wheel gpu_wheels.sh
#    carried in .whl/build/ (the image's setuptools stays as it is)
BUILD_WHEELS=${GPU_CHECK_BUILD_WHEELS:-.whl/build}
if [[ $SMOKE == 1 ]] && "$PYTHON" -c 'import spark_sparse.kernels' 2>/dev/null; then
    notes+=("smoke run: project already importable, not reinstalled")
else
    echo "[gpu_check] pip install --no-deps --no-build-isolation -e ."
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
        notes+=("project installed (editable)")
    elif compgen -G "$BUILD_WHEELS/setuptools-*.whl" > /dev/null; then
        echo "[gpu_check] the image's setuptools could not build it; again with $BUILD_WHEELS/ in an isolated build"
        if "$PYTHON" -m pip install -q --no-index --find-links "$BUILD_WHEELS" --no-deps -e .; then
            notes+=("project installed (editable; built with the carried setuptools, the image's failed)")
        else
            status=failed; notes+=("pip install -e . failed, also with the carried setuptools")
        fi
    else
        status=failed; notes+=("pip install -e . failed (no setuptools wheel in $BUILD_WHEELS/ to retry with)")
    fi
fi

export GPU_CHECK_INSTALL_STATUS=$status
export GPU_CHECK_INSTALL_NOTE="$(IFS=';'; echo "${notes[*]}")"
echo "[gpu_check] install: $status ($GPU_CHECK_INSTALL_NOTE) after $(( $(date +%s) - GPU_CHECK_T0 )) s"
exec "$PYTHON" benchmarks/gpu_check.py "$@"
