"""`rnp-fast sweep --backend ray` against a real Ray cluster started here, on 127.0.0.1 only.

The head node is what a user starts (`ray start --head`, token authentication on), bound to the
loopback address, with its own temporary folder and free ports; it stops at the end of the module
and after 20 minutes whatever happens (``timeout``). The tests: a wrong ``--address`` and a
missing token each fail on one line with exit 2 in well under a minute; a tiny sweep survives a
Ray worker killed mid-job (Ray reruns the task: every job recorded once, the rerun counted, the
killed task's scratch folder removed); and the same jobs give the same metrics on the local
backend and on Ray (each job runs with its own thread count on every backend). Without
``--address`` the sweep starts Ray itself: every socket its Ray processes listen on is loopback.

Marked ``ray``: `make test` leaves them out (minutes on 2 cores), .ci/run runs them (``-m ray``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_sweep import TINY_FIXED

from rnp_fast.sweep.backends import SCRATCH_PREFIX
from rnp_fast.sweep.store import open_existing

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install '.[ray]')"),
]

HEAD_LIFETIME_S = 1200  # the head stops itself after this, even if the tests' own cleanup never runs
# Ray picks the machine's interface address for its node unless told otherwise; with clusters
# "disabled" (as on macOS and Windows) every Ray process, the driver included, uses 127.0.0.1.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
TWO_JOBS = TINY_FIXED + "axes:\n  rnp.alpha: [0.2, 0.5]\n"  # one backdoored model, two defenses


@dataclass
class Head:
    address: str
    token: str
    temp: Path  # Ray's session folder: every process of this cluster names it on its command line

    def env(self, with_token: bool = True) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
        env.update(LOOPBACK)
        if with_token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def head():
    port, token = free_port(), secrets.token_hex(16)
    temp = Path(tempfile.mkdtemp(prefix="rnp-ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**Head(f"127.0.0.1:{port}", token, temp).env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    ray = str(Path(sys.executable).parent / "ray")
    command = [
        "timeout", str(HEAD_LIFETIME_S), ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
        f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
        f"--temp-dir={temp}", f"--ray-client-server-port={free_port()}", f"--dashboard-port={free_port()}",
    ]  # fmt: skip
    log = open(temp / "head.log", "wb")  # noqa: SIM115 (closed when the head stops)
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not listening(port):
            assert process.poll() is None and time.monotonic() < deadline, (temp / "head.log").read_text()[-3000:]
            time.sleep(0.5)
        yield Head(f"127.0.0.1:{port}", token, temp)
    finally:
        stop_head(process, temp)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def stop_head(process: subprocess.Popen, temp: Path) -> None:
    """``ray start --block`` stops its daemons on SIGTERM; then anything of this cluster left over
    (its process group, or a process naming its session folder) is killed."""
    process.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    for pid in pids_naming(str(temp)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def pids_naming(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


def parent_pid(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])


def sweep(sweep_file: Path, store: Path, *extra: str, env: dict, timeout: float = 900):
    command = [sys.executable, "-m", "rnp_fast", "sweep", str(sweep_file), "--store", str(store), "--quiet", *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- connecting


def test_unreachable_address_is_one_line_and_exit_2(head, tmp_path):
    sweep_file = tmp_path / "two.yaml"
    sweep_file.write_text(TWO_JOBS)
    wrong = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    result = sweep(sweep_file, tmp_path / "store", "--backend", "ray", "--address", wrong, env=head.env(), timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rnp-fast: error: ") and wrong in lines[0], result.stderr
    assert "no Ray cluster reachable" in lines[0] and "ray start --head" in lines[0]
    assert elapsed < 60, elapsed
    assert not (tmp_path / "store").exists()


def test_missing_auth_token_is_one_line_naming_ray_auth_mode(head, tmp_path):
    sweep_file = tmp_path / "two.yaml"
    sweep_file.write_text(TWO_JOBS)
    started = time.monotonic()
    result = sweep(
        sweep_file, tmp_path / "store", "--backend", "ray", "--address", head.address, env=head.env(False), timeout=120
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rnp-fast: error: "), result.stderr
    assert "RAY_AUTH_MODE=token" in lines[0] and head.address in lines[0]
    assert elapsed < 60, elapsed
    assert not (tmp_path / "store").exists()


# ----------------------------------------------------------------------------- a worker killed mid-job


@pytest.fixture(scope="module")
def killed_worker_sweep(head, tmp_path_factory):
    """The two-job sweep on the cluster; one Ray worker is killed (SIGKILL) while it runs a job.

    Returns (store, sweep file, the killed worker's scratch folder, the driver's summary)."""
    root = tmp_path_factory.mktemp("ray-sweep")
    sweep_file = root / "two.yaml"
    sweep_file.write_text(TWO_JOBS)
    store = root / "store"
    command = [sys.executable, "-m", "rnp_fast", "sweep", str(sweep_file), "--store", str(store), "--quiet"]
    command += ["--backend", "ray", "--address", head.address]
    with driver_process(command, head.env()) as driver:
        scratch = running_job_scratch(head, deadline=time.monotonic() + 300)
        time.sleep(3)  # well inside the job: training takes longer than this
        os.kill(int(re.match(rf"{SCRATCH_PREFIX}(\d+)-", scratch.name)[1]), signal.SIGKILL)
        out, err = driver.communicate(timeout=900)
    assert driver.returncode == 0, err[-3000:]
    return store, sweep_file, scratch, summary_of(out)


@contextlib.contextmanager
def driver_process(command: list[str], env: dict):
    """A sweep's driver as a child process (stdout and stderr piped), killed at the end of the
    block if it is still running, whatever happened inside."""
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield driver
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()


def summary_of(stdout: str) -> dict:
    """The driver's JSON summary: the last lines of stdout, after what Ray itself printed there
    (its raylet reports the killed worker on the driver's stdout)."""
    lines = stdout.splitlines()
    return json.loads("\n".join(lines[lines.index("{") :]))


def running_job_scratch(head: Head, deadline: float) -> Path:
    """The scratch folder of a job running in one of this cluster's workers (a child of its raylet)."""
    raylets = set(pids_naming(str(head.temp)))
    while time.monotonic() < deadline:
        for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
            match = re.match(rf"{SCRATCH_PREFIX}(\d+)-", folder.name)
            try:
                if match and parent_pid(int(match[1])) in raylets:
                    return folder
            except (OSError, IndexError, ValueError):
                pass
        time.sleep(0.2)
    raise AssertionError("no job started on the Ray cluster")


def test_sweep_survives_a_killed_worker_with_every_job_once(killed_worker_sweep):
    store, _, scratch, summary = killed_worker_sweep
    assert (summary["jobs"], summary["done"], summary["failed"]) == (2, 2, 0)
    rows = open_existing(store).rows()
    assert len(rows) == 2 and len({row["hash"] for row in rows}) == 2
    assert {row["status"] for row in rows} == {"done"}
    assert sorted(row["attempts"] for row in rows) == [1, 2]  # the killed job ran again, and it shows
    [rerun] = [row for row in rows if row["attempts"] == 2]
    log = (store / "sweep.log").read_text()
    assert log.count("done   ") == 2
    assert re.search(rf"retry  {rerun['hash']} .*started 2 times", log), log
    assert not scratch.exists()  # the killed task's scratch folder: removed by the next task on the node
    assert all(row["threads"] == 1 for row in rows)


def test_local_and_ray_backends_give_identical_metrics(killed_worker_sweep, tmp_path):
    """No thread setting in the environment: each job sets its own, the same in every process."""
    ray_store, sweep_file, _, _ = killed_worker_sweep
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    local = sweep(sweep_file, tmp_path / "local", "--gpus", "0", env=env)
    assert local.returncode == 0, local.stderr[-3000:]
    ray_rows = {row["hash"]: row for row in open_existing(ray_store).rows("done")}
    local_store = tmp_path / "local"
    local_rows = {row["hash"]: row for row in open_existing(local_store).rows("done")}
    assert ray_rows.keys() == local_rows.keys() and len(local_rows) == 2
    for job_hash, row in local_rows.items():
        assert ray_rows[job_hash]["metrics"] == row["metrics"], job_hash
        assert ray_rows[job_hash]["threads"] == row["threads"] == 1
        ray_masks, local_masks = (store / "jobs" / job_hash / "mask_values.txt" for store in (ray_store, local_store))
        assert ray_masks.read_text() == local_masks.read_text(), job_hash


def test_a_ray_started_by_the_sweep_listens_on_loopback_only(tmp_path):
    """No --address: Ray starts on this machine (its GCS, raylet, workers and this driver's own
    servers, all children of the driver); none may listen on the machine's network interface."""

    sweep_file = tmp_path / "one.yaml"
    sweep_file.write_text(TINY_FIXED + "axes:\n  rnp.alpha: [0.5]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # nothing set by the caller
    command = [sys.executable, "-m", "rnp_fast", "sweep", str(sweep_file), "--store", str(tmp_path / "store")]
    command += ["--quiet", "--backend", "ray"]
    seen, exposed = set(), set()
    with driver_process(command, env) as driver:
        deadline = time.monotonic() + 900  # bounded: a hung driver fails the test, and is killed
        while driver.poll() is None:
            assert time.monotonic() < deadline, "the one-job sweep on Ray did not finish in 15 minutes"
            for address, name in listening_sockets(driver.pid):
                seen.add(address)
                if address.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
                    exposed.add(f"{name} {address.ip}:{address.port}")
            time.sleep(0.5)
        out, err = driver.communicate(timeout=60)
    assert driver.returncode == 0, err[-3000:]
    assert summary_of(out)["done"] == 1
    assert len(seen) >= 2, "no Ray server was seen listening: the check saw nothing"
    assert not exposed, f"Ray listened on the network interface: {sorted(exposed)}"


def listening_sockets(pid: int):
    """(address, process name) of every listening TCP socket of process ``pid`` and its descendants
    (none if it has just exited)."""
    import psutil

    found = []
    try:
        driver = psutil.Process(pid)
        processes = [driver, *driver.children(recursive=True)]
    except psutil.Error:
        return found
    for process in processes:
        try:
            connections = process.net_connections(kind="tcp")
            name = process.name()
        except psutil.Error:  # gone meanwhile, or not ours to inspect
            continue
        found += [(c.laddr, name) for c in connections if c.status == psutil.CONN_LISTEN]
    return found
