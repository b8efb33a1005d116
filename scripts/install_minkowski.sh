#!/usr/bin/env bash
# Build MinkowskiEngine 0.5.4 CPU-only from PyPI's source and install it into the active Python.
# The wheel is cached in .cache/wheels/ and reused. About 5-10 minutes on 2 cores.
# Needs: a C++ compiler, libopenblas-dev (installed with apt-get when missing and we are root).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WHEELS=.cache/wheels
mkdir -p "$WHEELS"

if $PY - <<'PY' 2>/dev/null; then
import collections, collections.abc
if not hasattr(collections, "Sequence"):
    collections.Sequence = collections.abc.Sequence
import MinkowskiEngine
PY
    echo "MinkowskiEngine already importable"; exit 0
fi

if ! ls "$WHEELS"/[Mm]inkowski[Ee]ngine-0.5.4-*.whl >/dev/null 2>&1; then
    if [ ! -e /usr/include/x86_64-linux-gnu/openblas-pthread/cblas.h ] && [ ! -e /usr/include/openblas/cblas.h ] \
       && [ ! -e /usr/include/x86_64-linux-gnu/cblas.h ]; then
        if [ "$(id -u)" = 0 ]; then
            (apt-get update -qq && apt-get install -y -qq libopenblas-dev) >/dev/null
        else
            echo "libopenblas-dev is missing: install it (sudo apt-get install libopenblas-dev)" >&2; exit 1
        fi
    fi
    $PY -m pip install -q ninja setuptools wheel
    # MinkowskiEngine's setup.py calls `pip` and `ninja` from PATH: make them the active Python's.
    export PATH="$(dirname "$($PY -c 'import sys; print(sys.executable)')"):$PATH"
    echo "building MinkowskiEngine 0.5.4 (CPU only, 5-10 min)..."
    SETUPTOOLS_USE_DISTUTILS=stdlib MAX_JOBS=${MAX_JOBS:-2} $PY -m pip wheel --no-cache-dir --no-deps \
        --no-build-isolation -C--global-option=--cpu_only -C--global-option=--blas=openblas \
        -w "$WHEELS" MinkowskiEngine==0.5.4
fi
$PY -m pip install -q --no-deps "$WHEELS"/[Mm]inkowski[Ee]ngine-0.5.4-*.whl
echo "MinkowskiEngine installed"
