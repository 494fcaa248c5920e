# Setup and checks. `make install` works on a fresh Debian machine with no GPU.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-ffcv install-ray test test-heavy test-ray test-all lint format

install:  ## torch first where it is missing (CPU build here), then the package with dev tools
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev,triton]"

install-ffcv:  ## the optional FFCV extra: ffcv 1.0.2 compiles against these Debian packages (run as root)
	apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev
	$(PIP) install -e ".[ffcv]"

install-ray:  ## the optional Ray extra (`rnp-fast sweep --backend ray`)
	$(PIP) install -e ".[ray]"

test:  ## the quick suite, ~5 min on 2 cores (no GPU needed; GPU-only tests skip; heavy, slow and Ray-cluster ones deselected)
	$(PYTHON) -m pytest -q -m "not slow and not ray and not heavy" tests

test-heavy:  ## whole commands end to end (demo, killed sweeps, SIGKILL, compiles, the probe's deadline): ~7 min; .ci/run runs them
	$(PYTHON) -m pytest -q -m "heavy and not slow and not ray" tests

test-ray:  ## a Ray cluster on 127.0.0.1: address and auth errors, a killed worker, local == Ray (minutes)
	$(PYTHON) -m pytest -q -m "ray and not slow" tests

test-all:  ## everything, slow tests included (torch.compile on CPU, Ray, long sweeps)
	$(PYTHON) -m pytest -q tests

lint:
	$(PYTHON) -m ruff check rnp_fast loaders kernels tests benchmarks setup.py
	$(PYTHON) -m ruff format --check rnp_fast loaders kernels tests benchmarks setup.py

format:
	$(PYTHON) -m ruff format rnp_fast loaders kernels tests benchmarks setup.py
