"""Where jobs run: in the driver's process, in local worker processes (one per slot: a core, or a
share of a GPU; `rnp_fast.workers`), or as Ray tasks.

Every backend takes the jobs to run and an ``events`` object, calls ``events.started(job, where)``
when it hands a job out and ``events.finished(job, record)`` when its record is back; the driver
(see ``runner``) turns those calls into rows of the store. At most ``window`` jobs are out at once,
so "running" in the store means running, not queued.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import tempfile
from collections import deque
from contextlib import contextmanager
from pathlib import Path

from rnp_fast.errors import UserError
from rnp_fast.outputs import RunDirectory, process_alive
from rnp_fast.outputs.leftovers import is_empty, proven_ours
from rnp_fast.sweep.execute import run_job
from rnp_fast.sweep.job import Job
from rnp_fast.workers import WorkerPool, first_done, slot

RAY_INSTALL = "pip install 'rnp-fast[ray]'"
CONNECT_TIMEOUT_S = 5.0  # to open a TCP connection to --address before handing it to Ray
SCRATCH_PREFIX = "rnp-fast-job-"  # + "<pid>-<host>-": a Ray task's scratch folder (see ray_job)


class InProcess:
    """Jobs one after another in this process: compiled functions and loaded data stay warm."""

    def __init__(self, device: str, why: str = ""):
        self.device, self.why = device, why
        self.name = f"local ({device})"

    def run(self, jobs: list[Job], events, paths) -> None:
        for job in jobs:
            events.started(job, f"{worker_name()} {self.device}")
            record = run_job(job, paths.models, paths.job(job), self.device, paths.keep_purified)
            events.finished(job, {**record, "worker": f"{worker_name()} {self.device}"})

    def close(self) -> None:
        pass


class LocalWorkers:
    """One long-lived worker process per slot (``devices[i]``), each pinned to its device
    (`rnp_fast.workers`)."""

    def __init__(self, devices: list[str], why: str = ""):
        self.devices, self.why = devices, why
        self.name = f"local, {len(devices)} workers ({', '.join(sorted(set(devices)))})"
        self.pool = WorkerPool(devices)

    def run(self, jobs: list[Job], events, paths) -> None:
        def submit(job):
            return self.pool.submit(pool_job, job, paths.models, paths.job(job), paths.keep_purified)

        def wait_one(in_flight):
            future = first_done(in_flight)
            if future.exception() is not None:  # the process died; the job's own errors come back as data
                return future, {"error": f"worker process died: {future.exception()!r}"}
            return future, future.result()

        windowed(jobs, len(self.devices), submit, wait_one, events, "local worker")

    def close(self) -> None:
        self.pool.close()  # after Ctrl-C: the jobs still running are killed (the driver requeued them)


def pool_job(job: Job, models: Path, job_dir: Path, keep_purified: bool) -> dict:
    record = run_job(job, models, job_dir, slot(), keep_purified)
    return {**record, "worker": f"{worker_name()} {slot()}"}


class RayBackend:
    """One Ray task per job with its share of a GPU (``1 / jobs_per_gpu``) when the cluster has
    GPUs; Ray retries tasks whose worker died, and each try is counted (``attempts``) by a small
    actor the tasks report to. Tasks send their artifacts back and the driver writes them, so
    workers need no access to the store's disk."""

    def __init__(self, address: str | None, jobs_per_gpu: int, max_retries: int):
        self.ray = import_ray(address)
        self.owns_ray = not self.ray.is_initialized()  # else: the caller's Ray, left running at the end
        connect(self.ray, address)
        remove_dead_scratch()  # this node's, left by tasks killed in an earlier run
        resources = self.ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        self.gpu_share = 1.0 / jobs_per_gpu if gpus else 0.0
        self.window = gpus * jobs_per_gpu if gpus else max(1, int(resources.get("CPU", 1)))
        self.task = self.ray.remote(ray_job).options(
            num_cpus=1, num_gpus=self.gpu_share, max_retries=max_retries, retry_exceptions=False
        )
        self.tries = self.ray.remote(TryCounter).options(num_cpus=0).remote()
        self.name = f"ray ({int(resources.get('CPU', 0))} CPUs, {gpus} GPUs, {self.window} tasks at once)"
        self.why = "one task per job" + (
            f", 1/{jobs_per_gpu} of a GPU each" if gpus else ", one CPU and torch thread each"
        )

    def run(self, jobs: list[Job], events, paths) -> None:
        def submit(job):
            return self.task.remote(job, str(paths.models), paths.keep_purified, self.tries)

        def wait_one(in_flight):
            [ready], _ = self.ray.wait(list(in_flight), num_returns=1)
            job = in_flight[ready]
            try:
                record = self.ray.get(ready)
            except self.ray.exceptions.RayError as error:  # lost workers, after Ray's own retries
                record = {"error": f"ray task failed: {' '.join(str(error).split())[:500]}"}
            else:
                write_artifacts(paths.job(job), record.pop("files", {}))
            return ready, {**record, "tries": self.ray.get(self.tries.count.remote(job.hash))}

        windowed(jobs, self.window, submit, wait_one, events, "ray task")

    def close(self) -> None:
        if self.owns_ray:
            self.ray.shutdown()


class TryCounter:
    """A Ray actor: how many times each job's task started (Ray reruns a task whose worker died)."""

    def __init__(self):
        self.tries: dict[str, int] = {}

    def started(self, job_hash: str) -> None:
        self.tries[job_hash] = self.tries.get(job_hash, 0) + 1

    def count(self, job_hash: str) -> int:
        return self.tries.get(job_hash, 0)


def ray_job(job: Job, models_dir: str, keep_purified: bool, tries) -> dict:
    """A Ray task: run the job in scratch space and return its record with its files."""
    import ray

    ray.get(tries.started.remote(job.hash))
    remove_dead_scratch()
    device = "cuda" if ray.get_gpu_ids() else "cpu"  # Ray narrows CUDA_VISIBLE_DEVICES to this task's GPU
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-{socket.gethostname()}-") as scratch:
        job_dir = Path(scratch) / job.hash
        record = run_job(job, model_cache(Path(models_dir)), job_dir, device, keep_purified)
        if "error" not in record:
            record["files"] = {p.name: p.read_bytes() for p in job_dir.iterdir() if p.is_file()}
    return {**record, "worker": f"{worker_name()} {device}"}


def model_cache(models_dir: Path) -> Path:
    """The store's models directory when this node can write it (same machine or shared disk);
    otherwise a cache on this node, so a model is still trained once per node, not once per job."""
    if models_dir.parent.is_dir() and os.access(models_dir.parent, os.W_OK):
        return models_dir
    return Path(tempfile.gettempdir()) / "rnp-fast-models"


def write_artifacts(job_dir: Path, files: dict[str, bytes]) -> None:
    if not files:
        return
    with RunDirectory(job_dir, kind="sweep job") as run:
        for name, content in files.items():
            run.path(name).write_bytes(content)


def remove_dead_scratch() -> None:
    """Remove the scratch folders of this host's Ray tasks whose process is dead (a killed worker
    cannot clean up after itself). Only folders named by ray_job, owned by this user, made on this
    host by a process that no longer exists, and holding nothing but what rnp-fast can prove it
    wrote there (the job's run folder, or its staging folder); anything else is left alone."""
    pattern = re.compile(rf"{re.escape(SCRATCH_PREFIX)}(\d+)-(.+)-[A-Za-z0-9_]+")
    host = socket.gethostname()
    root = Path(tempfile.gettempdir())
    for folder in root.glob(f"{SCRATCH_PREFIX}*"):
        match = pattern.fullmatch(folder.name)
        if not match or match[2] != host or process_alive(int(match[1])):
            continue
        if folder.is_dir() and not folder.is_symlink() and folder.stat().st_uid == os.getuid() and holds_ours(folder):
            shutil.rmtree(folder, ignore_errors=True)


def holds_ours(folder: Path) -> bool:
    """Every entry of ``folder`` is a folder rnp-fast can prove its own (outputs.leftovers), or empty."""
    try:
        return all(
            entry.is_dir() and not entry.is_symlink() and (is_empty(entry) or proven_ours(entry))
            for entry in folder.iterdir()
        )
    except OSError:
        return False


LOOPBACK_HOSTS = ("127.", "localhost", "::1", "[::1]")


def import_ray(address: str | None = None):
    """Ray, imported so that a cluster on this machine alone stays on it: for no ``address`` (Ray
    starts one here) or a loopback one, every Ray process, this driver's servers included, listens
    on 127.0.0.1 rather than on the machine's network interface (Ray's default, even for a local
    instance). Ray reads the switch once, at import; a user's own setting is kept."""
    host = re.sub(r"^ray://", "", address or "127.0.0.1")
    if "ray" not in sys.modules and host.startswith(LOOPBACK_HOSTS):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise UserError(f"the ray backend needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


def connect(ray, address: str | None) -> None:
    """ray.init, with the two ways it fails for a user turned into one-line errors within seconds:
    nothing listening at ``address`` (Ray itself retries for minutes), and a cluster that asks for
    an authentication token the driver does not send (Ray retries for ~20 s, logging each try)."""
    if not address:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        return
    check_reachable(address)
    with stderr_captured() as captured:  # Ray's C++ client logs every failed try on fd 2
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
            failure = None
        except ConnectionError as error:
            failure = " ".join(str(error).split())[:300]
    if failure is None:
        sys.stderr.write(captured[0])  # what Ray said while connecting, as it would have appeared
        return
    if "InvalidAuthToken" in captured[0] or "Unauthenticated" in captured[0]:
        raise UserError(
            f"the Ray cluster at {address} refused this driver's authentication token: it uses token "
            "authentication (`ray start` turns it on), so run rnp-fast with RAY_AUTH_MODE=token and the "
            "cluster's token (in ~/.ray/auth_token, or in RAY_AUTH_TOKEN or the file RAY_AUTH_TOKEN_PATH; "
            "`ray get-auth-token` on the head node prints it)"
        )
    raise UserError(f"cannot connect to the Ray cluster at {address}: {failure}")


@contextmanager
def stderr_captured():
    """File descriptor 2 into a temporary file for the block; its text is in the yielded list after."""
    sys.stderr.flush()
    saved = os.dup(2)
    captured: list[str] = []
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))


def check_reachable(address: str) -> None:
    """A TCP connection to HOST:PORT (``ray://HOST:PORT`` too) within CONNECT_TIMEOUT_S; other forms
    of ``--address`` (``auto``) are left to Ray."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\[\]]+?)\]?:(\d+)", address)
    if not match:
        return
    host, port = match[1], int(match[2])
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UserError(
            f"--address {address}: no Ray cluster reachable there ({reason}); start one with "
            "`ray start --head` on that machine, or leave --address out to run Ray on this one"
        ) from None


def windowed(jobs: list[Job], window: int, submit, wait_one, events, where: str) -> None:
    """Keep up to ``window`` jobs out; report each as it starts and as it comes back.

    ``submit(job) -> handle``; ``wait_one({handle: job}) -> (handle, record)`` for a finished one."""
    queue, in_flight = deque(jobs), {}
    while queue or in_flight:
        while queue and len(in_flight) < window:
            job = queue.popleft()
            in_flight[submit(job)] = job
            events.started(job, where)
        handle, record = wait_one(in_flight)
        events.finished(in_flight.pop(handle), record)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
