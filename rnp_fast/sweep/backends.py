"""Where jobs run: in the driver's process, in one worker process per GPU slot, or as Ray tasks.

Every backend takes the jobs to run and an ``events`` object, calls ``events.started(job, where)``
when it hands a job out and ``events.finished(job, record)`` when its record is back; the driver
(see ``runner``) turns those calls into rows of the store. At most ``window`` jobs are out at once,
so "running" in the store means running, not queued.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
import socket
import tempfile
from collections import deque
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from rnp_fast.errors import UserError
from rnp_fast.outputs import RunDirectory
from rnp_fast.sweep.execute import run_job
from rnp_fast.sweep.job import Job

RAY_INSTALL = "pip install 'rnp-fast[ray]'"


class InProcess:
    """Jobs one after another in this process: compiled functions and loaded data stay warm."""

    def __init__(self, device: str):
        self.device = device
        self.name = f"local ({device})"

    def run(self, jobs: list[Job], events, paths) -> None:
        for job in jobs:
            events.started(job, f"{worker_name()} {self.device}")
            record = run_job(job, paths.models, paths.job(job), self.device, paths.keep_purified)
            events.finished(job, {**record, "worker": f"{worker_name()} {self.device}"})

    def close(self) -> None:
        pass


class WorkerPool:
    """One long-lived worker process per slot (``devices[i]``), each pinned to its device."""

    def __init__(self, devices: list[str]):
        self.devices = devices
        self.name = f"local, {len(devices)} workers ({', '.join(sorted(set(devices)))})"
        self.executor = None

    def start(self) -> futures.ProcessPoolExecutor:
        # spawn, not fork: forking a process that has started torch's threads (or CUDA) is unsafe.
        context = multiprocessing.get_context("spawn")
        slots = context.Queue()
        for device in self.devices:
            slots.put(device)
        threads = max(1, (os.cpu_count() or 1) // len(self.devices))
        return futures.ProcessPoolExecutor(
            len(self.devices), mp_context=context, initializer=claim_slot, initargs=(slots, threads)
        )

    def run(self, jobs: list[Job], events, paths) -> None:
        def submit(job):
            if self.executor is None:
                self.executor = self.start()
            try:
                return self.executor.submit(pool_job, job, paths.models, paths.job(job), paths.keep_purified)
            except BrokenProcessPool:  # a worker died (e.g. out of memory): start afresh
                self.executor = self.start()
                return self.executor.submit(pool_job, job, paths.models, paths.job(job), paths.keep_purified)

        def wait_one(in_flight):
            done, _ = futures.wait(in_flight, return_when=futures.FIRST_COMPLETED)
            future = next(iter(done))
            if future.exception() is not None:  # the process died; the job's own errors come back as data
                return future, {"error": f"worker process died: {future.exception()!r}"}
            return future, future.result()

        windowed(jobs, len(self.devices), submit, wait_one, events, "local worker")

    def close(self) -> None:
        if self.executor is not None:  # after Ctrl-C, do not wait for the jobs still running
            self.executor.shutdown(wait=False, cancel_futures=True)


_SLOT_DEVICE = "cpu"  # the device of this worker process, set once by claim_slot


def claim_slot(slots, threads: int) -> None:
    global _SLOT_DEVICE
    _SLOT_DEVICE = slots.get()
    if _SLOT_DEVICE == "cpu":  # the CPU's cores are shared among the workers
        import torch

        torch.set_num_threads(threads)


def pool_job(job: Job, models: Path, job_dir: Path, keep_purified: bool) -> dict:
    record = run_job(job, models, job_dir, _SLOT_DEVICE, keep_purified)
    return {**record, "worker": f"{worker_name()} {_SLOT_DEVICE}"}


class RayBackend:
    """One Ray task per job with its share of a GPU (``1 / jobs_per_gpu``) when the cluster has
    GPUs; Ray retries tasks whose worker died. Tasks send their artifacts back and the driver
    writes them, so workers need no access to the store's disk."""

    def __init__(self, address: str | None, jobs_per_gpu: int, max_retries: int):
        self.ray = import_ray()
        self.owns_ray = not self.ray.is_initialized()  # else: the caller's Ray, left running at the end
        self.ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        resources = self.ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        self.gpu_share = 1.0 / jobs_per_gpu if gpus else 0.0
        self.window = gpus * jobs_per_gpu if gpus else max(1, int(resources.get("CPU", 1)))
        self.task = self.ray.remote(ray_job).options(
            num_cpus=1, num_gpus=self.gpu_share, max_retries=max_retries, retry_exceptions=False
        )
        self.name = f"ray ({int(resources.get('CPU', 0))} CPUs, {gpus} GPUs, {self.window} tasks at once)"

    def run(self, jobs: list[Job], events, paths) -> None:
        def submit(job):
            return self.task.remote(job, str(paths.models), paths.keep_purified)

        def wait_one(in_flight):
            [ready], _ = self.ray.wait(list(in_flight), num_returns=1)
            try:
                record = self.ray.get(ready)
            except self.ray.exceptions.RayError as error:  # lost workers, after Ray's own retries
                return ready, {"error": f"ray task failed: {' '.join(str(error).split())[:500]}"}
            write_artifacts(paths.job(in_flight[ready]), record.pop("files", {}))
            return ready, record

        windowed(jobs, self.window, submit, wait_one, events, "ray task")

    def close(self) -> None:
        if self.owns_ray:
            self.ray.shutdown()


def ray_job(job: Job, models_dir: str, keep_purified: bool) -> dict:
    """A Ray task: run the job in scratch space and return its record with its files."""
    import ray

    device = "cuda" if ray.get_gpu_ids() else "cpu"  # Ray narrows CUDA_VISIBLE_DEVICES to this task's GPU
    with tempfile.TemporaryDirectory(prefix="rnp-fast-job-") as scratch:
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


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(f"the ray backend needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


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
