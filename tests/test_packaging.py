"""The install files agree: environment.yml (conda-forge only) carries every dependency of pyproject.toml."""
import re
from pathlib import Path

import pytest
import yaml   # a dependency of timm

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11 on")

REPO = Path(__file__).resolve().parents[1]
#: PyPI name -> conda-forge name, where they differ
CONDA_NAMES = {"torch": "pytorch", "matplotlib": "matplotlib-base"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement.strip(), maxsplit=1)[0].lower()


def _environment() -> dict:
    return yaml.safe_load((REPO / "environment.yml").read_text())


def test_environment_uses_conda_forge_only():
    assert _environment()["channels"] == ["conda-forge", "nodefaults"]


def test_environment_installs_every_runtime_dependency_of_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {CONDA_NAMES.get(_name(r), _name(r)) for r in project["dependencies"]}
    conda = {_name(d) for d in _environment()["dependencies"] if isinstance(d, str)}
    assert wanted <= conda, f"in pyproject.toml but not in environment.yml: {sorted(wanted - conda)}"


def test_environment_installs_the_project_itself_with_pip():
    pip = next(d["pip"] for d in _environment()["dependencies"] if isinstance(d, dict))
    assert "-e ." in pip and any(_name(p) == "spconv" for p in pip)


def _listed_packages() -> tuple[list[str], dict[str, str]]:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return setuptools["packages"], setuptools.get("package-dir", {})


def test_every_package_folder_is_listed_for_the_wheel():
    """``packages`` is an explicit list (the kernels/ folder installs as ``spark_sparse.kernels``), so a new
    sub-package left out of it is missing from a regular (non-editable) install while editable installs
    and the tests still find it on the source path."""
    listed, package_dir = _listed_packages()
    folders = set()
    for name, folder in {"spark_sparse": "spark_sparse", **package_dir}.items():
        folders |= {".".join([name, *init.parent.relative_to(REPO / folder).parts])
                    for init in (REPO / folder).rglob("__init__.py")}
    assert folders <= set(listed), f"sub-packages missing from [tool.setuptools] packages: {sorted(folders - set(listed))}"
