#!/usr/bin/env bash
export RNP_PROBE_T0=${RNP_PROBE_T0:-$(date +%s.%N)}  # first: the probe's budget counts from here (install included)
# The GPU probe (benchmarks/gpu_probe.py) in one call on the lent GPU machine: about 8 minutes, one
# JSON file written after every section. Arguments go to the probe; from the repository root:
#
#     bash benchmarks/gpu_suite.sh --out "$OUT/gpu_probe_h200.json"
#
# That machine has torch, triton, numpy, ... but no network: the package installs without
# dependencies, build isolation or an index. Where pip cannot build it (no setuptools, or an old one
# without `wheel`: a bare Python 3.12 venv), the source tree serves as installed: kernels/ and
# loaders/ are linked into rnp_fast/ (as rnp_fast.kernels / .loaders; git ignores the links), the
# tree goes on PYTHONPATH and a launcher provides the `rnp-fast` command.
# RNP_SUITE_INSTALL_ONLY=1: install, say how, and stop (CI checks both ways offline).
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
importable() { (cd / && "$PYTHON" -c 'import rnp_fast.kernels, rnp_fast.loaders' 2>/dev/null); }
PYTHON=$(command -v "$PYTHON")
how="already importable"
if ! importable; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e . >&2 || true
  how="pip install -e"
fi
scripts=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null) && export PATH="$scripts:$PATH"
if ! importable; then
  for part in kernels loaders; do [ -e "rnp_fast/$part" ] || ln -s "../$part" "rnp_fast/$part"; done
  bin="$PWD/build/gpu-suite-bin"
  mkdir -p "$bin" && printf '#!%s\nimport sys\nfrom rnp_fast.cli import main\nsys.exit(main())\n' "$PYTHON" >"$bin/rnp-fast"
  chmod +x "$bin/rnp-fast"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$bin:$PATH"
  how="source tree on PYTHONPATH"
  echo "gpu_suite.sh: pip could not install rnp_fast; reading the $how" >&2
fi
if [ "${RNP_SUITE_INSTALL_ONLY:-0}" = 1 ]; then
  importable && rnp-fast --help >/dev/null && echo "gpu_suite.sh: rnp_fast importable, rnp-fast runs ($how)"
  exit
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_probe.py "$@"
