# Setup and checks. `make install` works on a fresh Debian machine with no GPU.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test lint format

install:  ## torch first where it is missing (CPU build here), then the package with dev tools
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev,triton]"

test:  ## the whole suite (no GPU needed; GPU-only tests skip)
	$(PYTHON) -m pytest -q tests

lint:
	$(PYTHON) -m ruff check rnp_fast loaders kernels tests benchmarks
	$(PYTHON) -m ruff format --check rnp_fast loaders kernels tests benchmarks

format:
	$(PYTHON) -m ruff format rnp_fast loaders kernels tests benchmarks
