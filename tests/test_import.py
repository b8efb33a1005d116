"""Importing the package leaves the caller's process as it was (checked in a fresh interpreter)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: what a caller's process looks like before and after ``import spark_sparse`` (+ the CLI and trainer modules)
_PROBE = r"""
import collections, json, logging, signal, sys, warnings
import torch

def own_filters():
    # filters on a library's own warning class (sympy adds one when torch imports it) are that library's
    return [str(f) for f in warnings.filters if f[2].__module__ in ("builtins", "warnings")
            or f[2].__module__.startswith("spark_sparse")]

def snapshot():
    return {"collections": sorted(n for n in ("Sequence", "Mapping", "MutableMapping", "Iterable")
                                  if hasattr(collections, n)),
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "stdout": id(sys.stdout), "stderr": id(sys.stderr), "warning_filters": own_filters(),
            "root_handlers": len(logging.getLogger().handlers),
            "signals": [str(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM)],
            "default_dtype": str(torch.get_default_dtype()), "grad_enabled": torch.is_grad_enabled()}

before = snapshot()
import spark_sparse
import spark_sparse.cli, spark_sparse.train.engine, spark_sparse.train.visualize
after = snapshot()
heavy = sorted(m for m in ("spconv", "MinkowskiEngine", "matplotlib", "matplotlib.pyplot", "tensorboard")
               if m in sys.modules)
print(json.dumps({"before": before, "after": after, "heavy": heavy}))
"""


def _probe() -> dict:
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_loads_no_optional_library_and_changes_nothing_global():
    found = _probe()
    assert found["heavy"] == [], f"imported at import time: {found['heavy']}"
    changed = {k: (found["before"][k], found["after"][k]) for k in found["before"]
               if found["before"][k] != found["after"][k]}
    assert not changed, f"import spark_sparse changed the caller's process: {changed}"
