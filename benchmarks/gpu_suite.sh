#!/usr/bin/env bash
# The GPU probe (benchmarks/gpu_probe.py) in one call on the lent GPU machine: about 8 minutes, one
# JSON file written after every section. Arguments go to the probe; from the repository root:
#
#     bash benchmarks/gpu_suite.sh --out "$OUT/gpu_probe_h200.json"
#
# That machine has torch, triton, numpy, ... but no network: the package installs without
# dependencies, build isolation or an index; where even that cannot build, Python reads the source
# tree through a shadow package (kernels/ and loaders/ linked in as rnp_fast.kernels / .loaders).
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
importable() { "$PYTHON" -c 'import rnp_fast.kernels, rnp_fast.loaders' 2>/dev/null; }
importable || "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e . >&2 || true
if ! importable; then
  shadow=$(mktemp -d)/rnp_fast && mkdir -p "$shadow" && ln -s "$PWD"/rnp_fast/* "$PWD/kernels" "$PWD/loaders" "$shadow"
  export PYTHONPATH="$(dirname "$shadow")${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu_suite.sh: pip could not install rnp_fast; reading the source tree through $shadow" >&2
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_probe.py "$@"
