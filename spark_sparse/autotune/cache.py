"""The autotune cache: measured milliseconds in a JSON file, keyed by machine, versions and shapes.

Like ``cudnn.benchmark``'s, a measurement is only valid for the machine and software that made it,
so entries are grouped under an *environment* key (device name, torch and kernel-library versions,
a digest of our own kernels' source, one of each registered plug-in kernel's class source, CPU
threads) and, within it, keyed by what was measured (a layer's ``ConvSpec`` with dtype, the
power-of-two buckets of its active-row and site counts; or a whole encoder's shapes and plan).

The file lives in the user cache folder (``$SPARK_SPARSE_CACHE_DIR``, else
``$XDG_CACHE_HOME/spark-sparse``, else ``~/.cache/spark-sparse``). Writes merge with what is on
disk and replace the file atomically (temp file + rename), under an exclusive lock on a sibling
``.lock`` file where the OS has ``flock`` (POSIX), so runs that write at the same time keep each
other's entries. A file that cannot be read or parsed is reported and ignored:
tuning then measures again, and the next write replaces it.

An environment whose versions or kernel source changed is never matched again, so the file keeps
only the :data:`MAX_ENVIRONMENTS` most recently written ones: upgrades and kernel edits do not make
it grow (and every run parse it) without end.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import platform
import tempfile
import time
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import new_file_mode

try:
    import fcntl
except ImportError:      # Windows: writes stay atomic, concurrent writers may drop each other's newest entries
    fcntl = None

__all__ = ["CACHE_DIR_ENV", "CACHE_FILE", "TuneCache", "cache_dir", "environment_key", "kernels_digest",
           "plugin_kernels_digests", "canonical", "bucket"]

CACHE_DIR_ENV = "SPARK_SPARSE_CACHE_DIR"
CACHE_FILE = "autotune-v1.json"
FORMAT = "spark-sparse-autotune-cache/1"
#: environments kept in the file, the most recently written first (e.g. several venvs or GPUs in turn)
MAX_ENVIRONMENTS = 16
#: distributions whose version changes what a kernel costs
_LIBRARIES = ("spark-sparse", "spconv", "spconv-cu118", "spconv-cu120", "spconv-cu121", "spconv-cu124",
              "spconv-cu126", "cumm", "cumm-cu126", "MinkowskiEngine", "triton")


def cache_dir() -> Path:
    """Where the cache file lives (see the module docstring for the order of precedence)."""
    override = os.environ.get(CACHE_DIR_ENV)
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spark-sparse"


def canonical(value) -> str:
    """A stable string for a JSON-able key (sorted keys, no spaces)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def bucket(count: int) -> int:
    """The power of two at or above ``count``: runs whose active-row counts differ a little share entries."""
    return 1 << max(0, int(count) - 1).bit_length()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _library_versions() -> dict[str, str]:
    found = {}
    for dist in _LIBRARIES:
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return found


@functools.lru_cache(maxsize=1)
def kernels_digest() -> str:
    """A digest of the kernel package's source files: a change to our kernels (which the package
    version does not track between releases) makes earlier timings stale, so they are not reused."""
    from .. import kernels
    digest = hashlib.sha256()
    for path in sorted(Path(kernels.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def plugin_kernels_digests() -> dict[str, str]:
    """Registered kernel name -> a digest of its class source, for every kernel from outside our kernel package.

    :func:`kernels_digest` covers only our own kernels, and a plug-in's package version need not change when its
    code does (a notebook cell, an editable install), so without this a changed plug-in kept its old timings.
    Not cached: a notebook may redefine a kernel between runs. A class whose source cannot be read (defined in
    an ``exec``) is identified by module and qualified name only.
    """
    from .. import kernels
    digests = {}
    for name, cls in kernels.list_kernels().items():
        if cls.__module__.startswith(kernels.__name__ + "."):
            continue
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            source = f"{cls.__module__}.{cls.__qualname__}"
        digests[name] = hashlib.sha256(source.encode()).hexdigest()[:16]
    return digests


def environment_key(device: torch.device | str) -> dict:
    """What a measurement depends on besides the shapes: device, software versions (our kernels'
    source and plug-in kernels' included), CPU threads."""
    device = torch.device(device)
    key = {"device_type": device.type, "device": _device_name(device), "torch": torch.__version__,
           "libraries": _library_versions(), "kernels": kernels_digest()}
    plugins = plugin_kernels_digests()
    if plugins:                 # absent without plug-ins: the keys (and caches) of such users stay as they were
        key["plugin_kernels"] = plugins
    if device.type == "cpu":
        key["threads"] = torch.get_num_threads()
    return key


def _written(entry: dict) -> float:
    """When an environment's entry was last written (0 for entries from before the field existed)."""
    written = entry.get("written") if isinstance(entry, dict) else None
    return float(written) if isinstance(written, (int, float)) else 0.0


def _well_formed(entry) -> bool:
    """An environment's entry as :meth:`TuneCache.save` writes it: layer keys -> {kernel: ms}, encoder keys ->
    a guard result."""
    if not isinstance(entry, dict):
        return False
    layers, encoders = entry.get("layers", {}), entry.get("encoders", {})
    return (isinstance(layers, dict) and isinstance(encoders, dict)
            and all(isinstance(timings, dict) and all(isinstance(ms, (int, float)) for ms in timings.values())
                    for timings in layers.values())
            and all(isinstance(result, dict) for result in encoders.values()))


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive ``flock`` on ``lock_path`` (created if needed; left in place, as pip's and
    filelock's are: removing it would race a waiting writer). Without ``fcntl`` (Windows), no lock."""
    if fcntl is None:
        yield
        return
    fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT, 0o666)    # flock needs no write access (shared folders)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)                         # closing releases the lock


class TuneCache:
    """Layer timings and encoder-guard results of one environment, backed by one JSON file."""

    def __init__(self, environment: dict, directory: Optional[Path] = None):
        self.path = Path(directory if directory is not None else cache_dir()) / CACHE_FILE
        self.environment = canonical(environment)
        self._environment_value = environment
        self._layers: dict[str, dict[str, float]] = {}
        self._encoders: dict[str, dict] = {}
        self._dirty = False
        self._reported = False
        mine = self._read().get(self.environment, {})
        self._layers = dict(mine.get("layers", {}))
        self._encoders = dict(mine.get("encoders", {}))

    # ------------------------------------------------------------------ file
    def _read(self) -> dict:
        """The environments stored in the file (``{}`` when absent or unreadable, which is reported); entries
        of another shape are left out, so that what is read is what the tuner and :meth:`save` expect."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as err:
            self._report(f"cannot be read ({err})")
            return {}
        try:
            data = json.loads(raw.decode("utf-8"))     # UnicodeDecodeError is a ValueError
            if not isinstance(data, dict) or data.get("format") != FORMAT or \
                    not isinstance(data.get("environments"), dict):
                raise ValueError(f"not a {FORMAT} file")
        except ValueError as err:
            self._report(f"is corrupt ({err}); the next write replaces it")
            return {}
        environments = {env: entry for env, entry in data["environments"].items() if _well_formed(entry)}
        if len(environments) < len(data["environments"]):
            self._report("holds entries of another shape (left out; the next write drops them)")
        return environments

    def _report(self, problem: str) -> None:
        if not self._reported:
            warnings.warn(f"autotune cache file {self.path} {problem}; ignoring it (layers are measured again)",
                          RuntimeWarning, stacklevel=3)
        self._reported = True

    def save(self) -> None:
        """Merge this run's entries into the file and replace it atomically (never fatal)."""
        if not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _exclusive(self.path.with_name(self.path.name + ".lock")):
                self._merge_and_replace()
            self._dirty = False
        except OSError as err:
            warnings.warn(f"could not write the autotune cache file {self.path} ({err}); this run's measurements "
                          f"are not kept (set {CACHE_DIR_ENV} to a writable folder)", RuntimeWarning, stacklevel=2)

    def _merge_and_replace(self) -> None:
        """Read what is on disk, add this run's entries and replace the file (raises ``OSError``)."""
        environments = self._read()
        mine = environments.setdefault(self.environment, {})
        mine["environment"] = self._environment_value
        mine["written"] = time.time()
        mine.setdefault("layers", {}).update(self._layers)
        mine.setdefault("encoders", {}).update(self._encoders)
        newest = sorted(environments, key=lambda env: _written(environments[env]), reverse=True)[:MAX_ENVIRONMENTS]
        environments = {env: environments[env] for env in newest}
        fd, tmp = tempfile.mkstemp(prefix=".autotune-", suffix=".json", dir=self.path.parent)
        try:
            os.fchmod(fd, new_file_mode())      # mkstemp's 0o600 would hide a shared cache from the group
            with os.fdopen(fd, "w") as fh:
                json.dump({"format": FORMAT, "environments": environments}, fh, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.remove(tmp)               # a half-written file (disk full) is not left behind
            raise

    # ------------------------------------------------------------------ entries
    def layer(self, key: str) -> dict[str, float]:
        """Candidate kernel -> measured ms for a layer key (empty when never measured here)."""
        return dict(self._layers.get(key, {}))

    def put_layer(self, key: str, timings: dict[str, float]) -> None:
        self._layers[key] = {**self._layers.get(key, {}), **timings}
        self._dirty = True

    def encoder(self, key: str) -> Optional[dict]:
        return self._encoders.get(key)

    def put_encoder(self, key: str, result: dict) -> None:
        self._encoders[key] = result
        self._dirty = True
