"""pytest for the micro-benchmarks (benchmarks/micro/, pytest-benchmark): the CPU runs the Triton
kernels in Triton's interpreter, and every saved JSON describes the machine as rnp-fast's results do.

`make bench-micro` times them and saves ``--benchmark-json`` under benchmarks/results/; `make test`
runs each once with ``--benchmark-disable``, as a test of the variants' results, never of their speed.
This folder's scripts (bench_scoring, ...) import as modules here, as they do when run.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU; this must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_benchmark_update_machine_info(config, machine_info):
    """pytest-benchmark's machine description, plus rnp-fast's provenance: the device, CPU model,
    cores available to the process, torch threads and library versions."""
    from rnp_fast.provenance import provenance

    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine_info["rnp_fast"] = provenance(device)


@pytest.fixture
def synced():
    """synced(function): ``function`` followed by a device synchronisation, so that a timed call
    includes the GPU's work (CUDA calls return before it is done; pytest-benchmark does not wait)."""
    from rnp_fast.harness import synchronize

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def wrap(function):
        def call(*args):
            result = function(*args)
            synchronize(device)
            return result

        return call

    return wrap


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """The saved JSON keeps every statistic of every row but not each round's raw time (tens of
    thousands of numbers for the fast rows: megabytes in the repository, nothing read from them)."""
    for row in output_json["benchmarks"]:
        row["stats"].pop("data", None)
