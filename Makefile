# Two entry points for a fresh machine: `make demo` and `make test` (each sets up .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install install-minkowski demo test benchmarks-md clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/.installed

# once per environment, and again when pyproject.toml changes (the package itself is installed editable): a
# second `make demo` or `make test` starts at once, offline too
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	# torch and torchvision as one matching pair (an older CPU-only torch found on some machines does not
	# import PyPI's torchvision); on Linux x86_64 this torch is a CUDA build, which runs on CPUs too
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# MinkowskiEngine has no wheels: build it (5-10 min on 2 cores, cached in .cache/wheels). A failed
# build is reported and its tests then skip with the import error; it never hides other results.
install-minkowski: install
	PYTHON=$(BIN)/python bash scripts/install_minkowski.sh || \
		echo "WARNING: MinkowskiEngine could not be built; the minkowski backend's tests will skip"

# the demo starts over each time (--overwrite replaces the previous demo's output_demo/)
demo: install
	$(BIN)/spark-pretrain --overwrite

test: install-minkowski
	$(BIN)/python -m pytest -q --durations=30

# BENCHMARKS.md from benchmarks/results/*/ and benchmarks/BENCHMARKS.template.md (never edited by hand)
benchmarks-md: $(BIN)/python
	$(BIN)/python benchmarks/render_benchmarks.py

clean:
	rm -rf $(VENV) .pytest_cache
