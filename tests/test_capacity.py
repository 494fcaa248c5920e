"""How many jobs run at once (rnp_fast.capacity): cores, affinity, memory, the user's flag; and
the worker pool's processes never outliving their driver (rnp_fast.workers)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rnp_fast import capacity
from rnp_fast.capacity import GIB, decide, job_memory
from rnp_fast.config import DataConfig, ModelConfig
from rnp_fast.demo import DEMO_DATA, DEMO_MODEL


def test_without_a_flag_one_job_per_core_at_most_the_work():
    assert decide(None, cores=8, work=20, per_job=GIB, memory=64 * GIB).jobs == 8
    few = decide(None, cores=8, work=3, per_job=GIB, memory=64 * GIB)
    assert few.jobs == 3 and "at most the 3 jobs to run" in few.reason
    one = decide(None, cores=1, work=4, per_job=GIB, memory=64 * GIB)
    assert one.jobs == 1 and "one per core available to this process (1)" in one.reason


def test_the_users_flag_wins_over_the_cores():
    asked = decide(3, cores=32, work=10, per_job=GIB, memory=64 * GIB)
    assert asked.jobs == 3 and "as asked (--jobs-per-device 3)" in asked.reason
    assert decide(6, cores=2, work=10, per_job=GIB, memory=64 * GIB).jobs == 6  # oversubscribing is the user's call


def test_memory_reduces_the_parallelism_and_says_so():
    short = decide(None, cores=16, work=16, per_job=2 * GIB, memory=7 * GIB)
    assert short.jobs == 3
    assert "reduced from 16 to 3: memory (~2.00 GiB each, 7.0 GiB available)" in short.reason
    assert decide(8, cores=16, work=16, per_job=2 * GIB, memory=7 * GIB).jobs == 3  # the flag too
    none_fit = decide(None, cores=4, work=4, per_job=8 * GIB, memory=GIB)
    assert none_fit.jobs == 1 and "not even one fits" in none_fit.reason
    unknown = decide(None, cores=4, work=4, per_job=GIB, memory=None)
    assert unknown.jobs == 4 and "free memory unknown" in unknown.reason


def test_gpus_take_one_job_each_unless_asked():
    assert decide(None, cores=64, work=10, per_job=GIB, memory=64 * GIB, gpus=4).jobs == 4
    shared = decide(2, cores=64, work=10, per_job=GIB, memory=64 * GIB, gpus=4)
    assert shared.jobs == 8 and "2 per GPU on 4 GPU(s)" in shared.reason


def test_cores_are_the_affinity_capped_by_a_cgroup_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    monkeypatch.setattr(capacity, "cgroup_cpu_quota", lambda: None)
    assert capacity.available_cores() == 3  # not os.cpu_count(): taskset and cpusets count
    monkeypatch.setattr(capacity, "cgroup_cpu_quota", lambda: 2)
    assert capacity.available_cores() == 2


def test_memory_is_meminfo_or_the_cgroups_limit_whichever_is_smaller(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683784 kB\nMemFree:  100 kB\nMemAvailable:   8388608 kB\n")
    assert capacity.meminfo_available(meminfo) == 8 * GIB
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text(str(GIB))
    assert capacity.cgroup_memory_left(cgroup) is None  # no limit
    (cgroup / "memory.max").write_text(str(4 * GIB))
    assert capacity.cgroup_memory_left(cgroup) == 3 * GIB
    monkeypatch.setattr(capacity, "meminfo_available", lambda: 8 * GIB)
    monkeypatch.setattr(capacity, "cgroup_memory_left", lambda: 3 * GIB)
    assert capacity.available_memory() == 3 * GIB


def test_a_jobs_memory_grows_with_its_model_and_data():
    demo = job_memory(DEMO_MODEL, DataConfig(**DEMO_DATA))
    assert 0.6 * GIB < demo < 1.2 * GIB  # measured: a demo defense's worker peaks at 0.72 GiB
    cifar = job_memory(ModelConfig("resnet18"), DataConfig(dataset="cifar10"))
    assert cifar > 3 * demo
    assert job_memory(ModelConfig("resnet18"), DataConfig(dataset="cifar10"), "cuda") < cifar  # activations on the GPU


DRIVER = textwrap.dedent(
    """
    import sys, time
    from rnp_fast.workers import WorkerPool

    if __name__ == "__main__":
        pool = WorkerPool(["cpu", "cpu"])
        futures = [pool.submit(time.sleep, 600) for _ in range(2)]
        while len(pool.executor._processes) < 2:
            time.sleep(0.1)
        print(" ".join(str(pid) for pid in pool.executor._processes), flush=True)
        time.sleep(600)
    """
)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_with_a_driver_killed_by_sigkill(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in driver.stdout.readline().split()]
        assert len(workers) == 2 and all(alive(pid) for pid in workers)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in workers if alive(pid)]
    for pid in survivors:  # not left sleeping behind a failed test
        os.kill(pid, signal.SIGKILL)
    assert not survivors, "a worker outlived its driver"
