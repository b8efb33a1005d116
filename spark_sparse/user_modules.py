"""Import a user's own Python module, so that what it registers (encoders with ``@register_model``, blocks
with ``@register_container``, layers with ``@register_converter``) exists before a run looks it up.

``spark-pretrain --import_module my_models --model my_cnn`` needs this: a console script does not
have the current folder on ``sys.path`` (``python -m`` does), and a user's model file is not part
of this package. A module is named by its dotted name (looked up in the environment, then the
current folder; a name that is both is refused) or by a path to a ``.py`` file (imported under the
file's stem). Importing is idempotent: a run imports the modules of its configuration again
(spawned processes, the Python API) and gets the module already loaded.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from .errors import SparkSparseError

__all__ = ["UserModuleError", "import_user_module"]


class UserModuleError(SparkSparseError, ImportError):
    """A module asked for by name or path that cannot be found (or two files competing for one name)."""


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or (os.altsep is not None and os.altsep in spec)


def _import_file(spec: str) -> ModuleType:
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise UserModuleError(f"--import_module {spec}: no such file ({path})")
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None:
        if getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == path:
            return loaded
        raise UserModuleError(f"--import_module {spec}: a module named {name!r} is already loaded from "
                              f"{getattr(loaded, '__file__', None) or 'elsewhere'}; rename the file")
    _on_path(str(path.parent))        # as `python file.py` has it: the file may import the modules beside it
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module            # before running it, as a normal import does (dataclasses, pickling)
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _on_path(folder: str) -> None:
    """Let imports find modules in ``folder``, after the environment's: a local file never shadows a package."""
    if folder not in sys.path:
        sys.path.append(folder)


def _refuse_shadowed_local(spec: str, folder: str) -> None:
    """A dotted name whose top module is both a file in ``folder`` and a module of the environment (``test``,
    ``utils``) imports the environment's: refused, naming both, rather than importing what was not meant."""
    top = spec.split(".")[0]
    local = next((path for path in (Path(folder, f"{top}.py"), Path(folder, top, "__init__.py")) if path.is_file()), None)
    if local is None:
        return
    found = importlib.util.find_spec(top)
    if found is not None and found.origin and Path(found.origin).resolve() != local.resolve():
        if local.name == f"{top}.py":
            way_out = f"pass the file's path (--import_module ./{local.name}) or rename it"
        elif found.origin in ("built-in", "frozen") or top in sys.modules:     # found before any folder
            way_out = "rename the package"
        else:
            way_out = "rename the package, or put the current folder first (PYTHONPATH=. spark-pretrain ...)"
        raise UserModuleError(f"--import_module {spec}: the name {top!r} is the environment's module ({found.origin}), "
                              f"found before {local} in the current folder; {way_out}")


def _import_name(spec: str) -> ModuleType:
    cwd = os.getcwd()
    if "" not in sys.path:
        _on_path(cwd)
    _refuse_shadowed_local(spec, cwd)
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as err:
        if err.name is None or not (spec == err.name or spec.startswith(err.name + ".")):
            raise                         # the module exists but imports something missing: its traceback helps
        raise UserModuleError(f"--import_module {spec}: no module named {err.name!r} in the current folder ({cwd}) "
                              f"or the environment; give a dotted module name or a path to a .py file") from None


def import_user_module(spec: str) -> ModuleType:
    """The module ``spec`` names (dotted name, or path to a ``.py`` file), imported once.

    A module that cannot be found is a :class:`UserModuleError`; an error raised by the module's own
    code propagates with its traceback (it is a bug in that module, to be fixed there).
    """
    return _import_file(spec) if _is_path(spec) else _import_name(spec)
