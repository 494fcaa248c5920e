# Setup and checks. `make install` works on a fresh Debian machine with no GPU.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.13.0

MICRO_JSON ?= benchmarks/results/micro_cpu.json
QUICK = -m "not slow and not ray and not heavy"

.PHONY: install install-ffcv install-ray test test-heavy test-ray test-all bench-micro lint format

install:  ## torch first where it is missing (CPU build here), then the package with dev tools
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev,triton]"

install-ffcv:  ## the optional FFCV extra: ffcv 1.0.2 compiles against these Debian packages (run as root)
	apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev
	$(PIP) install -e ".[ffcv]"

install-ray:  ## the optional Ray extra (`rnp-fast sweep --backend ray`)
	$(PIP) install -e ".[ray]"

test:  ## the quick suite, ~5 min on 2 cores (no GPU needed; GPU-only tests skip; heavy, slow and Ray-cluster ones deselected); the micro-benchmarks once each, as tests
	$(PYTHON) -m pytest -q $(QUICK) tests
	$(PYTHON) -m pytest -q $(QUICK) --benchmark-disable benchmarks/micro

test-heavy:  ## whole commands end to end (demo, killed sweeps, SIGKILL, compiles, the probe's deadline): ~7 min; .ci/run runs them
	$(PYTHON) -m pytest -q -m "heavy and not slow and not ray" tests

test-ray:  ## a Ray cluster on 127.0.0.1: address and auth errors, a killed worker, local == Ray (minutes)
	$(PYTHON) -m pytest -q -m "ray and not slow" tests

test-all:  ## everything, slow tests included (torch.compile on CPU, Ray, long sweeps)
	$(PYTHON) -m pytest -q tests
	$(PYTHON) -m pytest -q --benchmark-disable benchmarks/micro

bench-micro:  ## time the phases' variants (pytest-benchmark; compiled rows too): a group per phase, JSON with the machine in $(MICRO_JSON)
	$(PYTHON) -m pytest -q -m "not ray" --benchmark-only --benchmark-warmup=on --benchmark-group-by=group \
		--benchmark-json=$(MICRO_JSON) benchmarks/micro

lint:
	$(PYTHON) -m ruff check rnp_fast loaders kernels tests benchmarks setup.py
	$(PYTHON) -m ruff format --check rnp_fast loaders kernels tests benchmarks setup.py

format:
	$(PYTHON) -m ruff format rnp_fast loaders kernels tests benchmarks setup.py
