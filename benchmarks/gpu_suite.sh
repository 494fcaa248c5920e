#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, in one call on a CUDA machine (an H100 here is
# expected to need about 20 minutes); each result is saved under benchmarks/results/ as JSON with
# the device, versions, date and command. Run from the repository root:
#
#     bash benchmarks/gpu_suite.sh            # everything
#     bash benchmarks/gpu_suite.sh kernel     # one part: tests kernel sweep bench train phases
#
# On the project's lent GPU machine (torch, triton, safetensors, matplotlib, ... already there, no
# internet) the package installs without dependencies or build isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import rnp_fast" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e .
export PYTHONUNBUFFERED=1
R=benchmarks/results
slug=$(python3 -c "import torch; print(torch.cuda.get_device_name().lower().replace('nvidia ', '').replace(' ', '_'))")
parts=${*:-tests kernel sweep bench train phases}

for part in $parts; do
  echo "== $part ($(date -u +%H:%M:%S))"
  case $part in
    tests)   # the CUDA halves of the kernel tests, compiled recover step, everything else on CUDA
      python3 -m pytest -q -x tests/test_masked_bn_kernel.py tests/test_engine.py tests/test_batched_scoring.py ;;
    kernel)  # issue 4: masked BatchNorm, eager vs compiled vs Triton, and the --bn-kernel auto table
      python3 benchmarks/bench_masked_bn.py --out "$R/masked_bn_$slug.json" --write-auto-table ;;
    sweep)   # issue 5: 19 thresholds over 9,000 + 9,000 images, batched vs sequential vs reference
      python3 benchmarks/bench_sweep.py --workload cifar --device cuda --amp bf16 --channels-last \
        --mask-file tests/data/reference/mask_values.txt --out "$R/sweep_cifar_$slug.json" ;;
    bench)   # issue 6: end to end, per-epoch evaluation on and off; cold start from an empty cache
      rnp-fast bench --workload cifar --device cuda --repeats 3 --fresh-compile-cache \
        --out "$R/bench_cifar_$slug.json"
      rnp-fast bench --workload cifar --device cuda --repeats 3 --eval-every 0 --modes fast \
        --out "$R/bench_cifar_noeval_$slug.json" ;;
    train)   # issue 3: train-backdoor images per second, fast engine vs eager fp32
      python3 benchmarks/bench_train.py --device cuda --out "$R/train_$slug.json" ;;
    phases)  # issue 6: per-phase pytest-benchmark suites (recover epoch with and without the kernel)
      python3 benchmarks/bench_phases.py --device cuda --out "$R/phases_$slug.json" ;;
    *) echo "unknown part: $part (tests kernel sweep bench train phases)" >&2; exit 2 ;;
  esac
done
