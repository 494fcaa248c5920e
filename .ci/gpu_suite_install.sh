#!/usr/bin/env bash
# benchmarks/gpu_suite.sh's install, both ways, offline, as on the GPU machine (no network):
#   1. PYTHON has setuptools: `pip install --no-index --no-deps --no-build-isolation -e .` works;
#   2. a bare Python venv (no setuptools, no wheel, as `python3.12 -m venv` makes it): pip cannot
#      build, and the shadow package with its `rnp-fast` launcher must serve instead.
# Each runs on a fresh copy of the committed tree. Usage: gpu_suite_install.sh PYTHON_WITH_TORCH
set -euo pipefail
python_with_torch=$1
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

fresh_copy() {
  mkdir -p "$work/$1" && git -C "$repo" archive HEAD | tar -x -C "$work/$1"
  echo "$work/$1"
}

expect() {  # expect WORDS COMMAND...: the command succeeds and says WORDS
  local words=$1 out
  shift
  out=$("$@" 2>&1) || { echo "$out"; echo "FAILED: $*"; return 1; }
  echo "$out" | tail -2
  grep -q "$words" <<<"$out" || { echo "FAILED: expected '$words'"; return 1; }
}

# 1. pip works (setuptools present), without an index: a throwaway venv sharing PYTHON's packages
copy=$(fresh_copy with-pip)
"$python_with_torch" -m venv --system-site-packages "$work/venv-pip"
site=$("$python_with_torch" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
echo "$site" >"$("$work/venv-pip/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/with-torch.pth"
(cd "$copy" && PIP_NO_INDEX=1 PYTHON="$work/venv-pip/bin/python" RNP_SUITE_INSTALL_ONLY=1 \
  expect "rnp-fast runs (pip install -e)" bash benchmarks/gpu_suite.sh)

# 2. a bare venv: torch importable (a .pth to PYTHON's packages), setuptools and wheel not
copy=$(fresh_copy bare)
"$python_with_torch" -m venv "$work/venv-bare"
bare_site=$("$work/venv-bare/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
echo "$site" >"$bare_site/with-torch.pth"
for missing in setuptools wheel; do  # the venv's own folder comes first on sys.path: these hide PYTHON's
  mkdir -p "$bare_site/$missing"
  echo "raise ImportError('$missing is not installed in this bare venv')" >"$bare_site/$missing/__init__.py"
done
if (cd "$copy" && PIP_NO_INDEX=1 "$work/venv-bare/bin/python" -m pip install -q --no-index --no-deps \
  --no-build-isolation -e . >/dev/null 2>&1); then
  echo "FAILED: pip built the package in the bare venv: the fallback is not exercised"
  exit 1
fi
(cd "$copy" && PIP_NO_INDEX=1 PYTHON="$work/venv-bare/bin/python" RNP_SUITE_INSTALL_ONLY=1 \
  expect "rnp-fast runs (source tree on PYTHONPATH)" bash benchmarks/gpu_suite.sh)
echo "gpu_suite.sh installs offline both ways"
