# Set-up and checks. On a fresh clone `make demo` and `make test` are all a user types: with no
# virtual environment active they make `.venv` and use it, install the package once (a stamp file in
# the environment says it is done; `make install` always reinstalls), then run.
#
# Which Python: PYTHON=... when given (installed into as it is, no stamp), else the active virtual
# environment (or a conda environment other than base), else .venv, made with $(VENV_PYTHON).
VENV_PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_OUT ?= runs/demo

MICRO_JSON ?= benchmarks/results/micro_cpu.json
QUICK = -m "not slow and not ray and not heavy"

ifneq ($(filter command line environment,$(origin PYTHON)),)
  PY := $(PYTHON)
  STAMP :=
else ifneq ($(VIRTUAL_ENV),)
  ENV_DIR := $(VIRTUAL_ENV)
else ifneq ($(and $(CONDA_PREFIX),$(filter-out base,$(CONDA_DEFAULT_ENV))),)
  ENV_DIR := $(CONDA_PREFIX)
else
  ENV_DIR := .venv
endif
ifdef ENV_DIR
  PY := $(ENV_DIR)/bin/python
  # one stamp per checkout: two clones sharing an environment each install their own source
  STAMP := $(ENV_DIR)/.rnp-fast-installed-$(shell printf '%s' '$(CURDIR)' | cksum | cut -d' ' -f1)
endif
PIP := $(PY) -m pip

.PHONY: setup install demo test test-heavy test-ray test-all bench-micro lint format install-ffcv install-ray

setup: $(or $(STAMP),install)  ## the environment, installed when needed (what demo and test run first)

demo: setup  ## defend the bundled BadNets model on the digits set (CPU: minutes) into $(DEMO_OUT)
	$(PY) -m rnp_fast demo --out $(DEMO_OUT)
	@echo "make demo: the run directory is $(DEMO_OUT) (summary.json, output.log, purified.safetensors)"

test: setup  ## the quick suite, ~5 min on 2 cores (no GPU needed; GPU-only tests skip; heavy, slow and Ray-cluster ones deselected); the micro-benchmarks once each, as tests
	$(PY) -m pytest -q $(QUICK) tests
	$(PY) -m pytest -q $(QUICK) --benchmark-disable benchmarks/micro

.venv/bin/python:
	$(VENV_PYTHON) -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip || echo "make: pip not upgraded (offline?); going on with the venv's own"

# torch first where it is missing: PyPI's Linux wheel is the CUDA build (with ~2.7 GB of nvidia-*
# packages), so a Linux machine without an NVIDIA driver takes the CPU-only build: pip's own choice
# when that already is one (a local CPU wheel, as on machines with a wheel house), else PyTorch's
# CPU-only index. The last line says which build came.
define install_steps
@if $(PY) -c "import torch" 2>/dev/null; then \
  echo "make: torch is already installed; leaving it"; \
elif [ "$$(uname -s)" != Linux ] || command -v nvidia-smi >/dev/null || [ -e /proc/driver/nvidia ]; then \
  echo "make: $(TORCH_SPEC) from PyPI (its default build: CUDA on Linux)"; \
  $(PIP) install "$(TORCH_SPEC)"; \
elif $(PIP) install --dry-run --no-deps --quiet --report - "$(TORCH_SPEC)" 2>/dev/null \
    | $(PY) -c 'import json, sys; sys.exit("+cpu" not in json.load(sys.stdin)["install"][0]["metadata"]["version"])'; then \
  echo "make: no NVIDIA driver; pip's $(TORCH_SPEC) is a CPU build already: installing it"; \
  $(PIP) install "$(TORCH_SPEC)"; \
else \
  echo "make: no NVIDIA driver: $(TORCH_SPEC), CPU-only build, from $(TORCH_CPU_INDEX)"; \
  $(PIP) install "$(TORCH_SPEC)" --index-url "$(TORCH_CPU_INDEX)"; \
fi
$(PIP) install -e ".[dev,triton]"
@$(PY) -c 'import torch; print("make: torch", torch.__version__, "(" + ("CUDA " + torch.version.cuda if torch.version.cuda else "CPU-only") + " build)")'
endef

install: $(if $(STAMP),$(ENV_DIR)/bin/python)  ## torch where missing (see above), then the package with dev tools; always runs
	$(install_steps)
	$(if $(STAMP),touch "$(STAMP)")

ifdef STAMP
$(STAMP): setup.py pyproject.toml | $(ENV_DIR)/bin/python
	$(install_steps)
	touch "$@"
endif

install-ffcv: setup  ## the optional FFCV extra: ffcv 1.0.2 compiles against these Debian packages (run as root)
	apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev
	$(PIP) install -e ".[ffcv]"

install-ray: setup  ## the optional Ray extra (`rnp-fast sweep --backend ray`)
	$(PIP) install -e ".[ray]"

test-heavy: setup  ## whole commands end to end (demo, killed sweeps, SIGKILL, compiles, the probe's deadline): ~7 min; .ci/run runs them
	$(PY) -m pytest -q -m "heavy and not slow and not ray" tests

test-ray: setup  ## a Ray cluster on 127.0.0.1: address and auth errors, a killed worker, local == Ray (minutes)
	$(PY) -m pytest -q -m "ray and not slow" tests

test-all: setup  ## everything, slow tests included (torch.compile on CPU, Ray, long sweeps)
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q --benchmark-disable benchmarks/micro

bench-micro: setup  ## time the phases' variants (pytest-benchmark; compiled rows too): a group per phase, JSON with the machine in $(MICRO_JSON)
	$(PY) -m pytest -q -m "not ray" --benchmark-only --benchmark-warmup=on --benchmark-group-by=group \
		--benchmark-json=$(MICRO_JSON) benchmarks/micro

lint: setup
	$(PY) -m ruff check rnp_fast loaders kernels tests benchmarks setup.py
	$(PY) -m ruff format --check rnp_fast loaders kernels tests benchmarks setup.py

format: setup
	$(PY) -m ruff format rnp_fast loaders kernels tests benchmarks setup.py
