"""`rnp-fast sweep`: check the sweep file, register its jobs in the store, run the unfinished ones.

Resuming is the same command again: finished jobs are skipped, jobs that were running when a
previous driver died run again, and failed jobs run again only with ``retry_failed``.

Store layout::

    STORE/results.sqlite        one row per job (see ``store``)
    STORE/sweep.log             a line per job started, finished or failed (tracebacks included)
    STORE/models/<train hash>/  backdoored model shared by the jobs with that training configuration
    STORE/jobs/<job hash>/      the job's defense: masks, pruning table and csv, plot, summary, logs
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rnp_fast.capacity import Parallelism, available_cores, available_memory, decide, job_memory
from rnp_fast.config import SweepRunConfig
from rnp_fast.errors import UserError
from rnp_fast.outputs import SWEEP_STORE, vet_output, writing_inside
from rnp_fast.outputs.leftovers import clean_up_after_killed_runs
from rnp_fast.sweep.job import Job
from rnp_fast.sweep.progress import SweepLog
from rnp_fast.sweep.spec import Sweep, load_sweep
from rnp_fast.sweep.store import DATABASE, ResultsStore, check_database, exclusive, is_old_store


@dataclass
class StorePaths:
    """Where a job's files go, and whether it keeps its purified model."""

    directory: Path
    keep_purified: bool

    @property
    def models(self) -> Path:
        return self.directory / "models"

    def job(self, job: Job) -> Path:
        return self.directory / "jobs" / job.hash


def run_sweep(sweep_file: str, options: SweepRunConfig) -> dict:
    started = time.perf_counter()
    directory = vet_output(options.store, [sweep_file], flag="--store", owned=is_old_store, kind=SWEEP_STORE)
    check_database(directory / DATABASE)  # a results.sqlite of another application is never written
    sweep = load_sweep(sweep_file, options.max_jobs)  # every check happens here, before anything is written
    backend = make_backend(options, sweep.jobs)
    try:
        with exclusive(directory), writing_inside(directory):  # its jobs, models (and Ray's artifacts)
            store = ResultsStore(directory)
            try:
                counts = run_pending(sweep, store, backend, StorePaths(directory, sweep.keep_purified), options)
            finally:
                store.requeue("running")  # interrupted (Ctrl-C): run them next time
                store.close()
    finally:
        backend.close()
    return {"store": str(directory), "sweep": sweep.name, **counts, "seconds": time.perf_counter() - started}


def run_pending(sweep: Sweep, store: ResultsStore, backend, paths: StorePaths, options: SweepRunConfig) -> dict:
    remove_partial_outputs(paths)
    new = store.add_jobs(sweep.jobs, sweep.name, time.time())
    interrupted = store.requeue("running")  # only a dead driver leaves rows running: we hold the lock
    retried = store.requeue("failed", [job.hash for job in sweep.jobs]) if options.retry_failed else 0
    status = store.statuses()
    todo = [job for job in sweep.jobs if status[job.hash] == "pending"]
    log = SweepLog(paths.directory, len(todo), options.quiet)
    try:
        log.info(f"{backend.name}: {backend.why}")
        log.info(
            f"sweep {sweep.name}: {len(sweep.jobs)} jobs ({new} new), {len(todo)} to run "
            f"({interrupted} interrupted earlier, {retried} failed retried) on {backend.name}"
        )
        recorder = Recorder(store, log)
        backend.run(todo, recorder, paths)
    finally:
        log.close()
    final = store.statuses()
    outcomes = [final[job.hash] for job in sweep.jobs]
    return {
        "jobs": len(sweep.jobs),
        "ran": recorder.ran,
        "done": outcomes.count("done"),
        "failed": outcomes.count("failed"),
        "backend": backend.name,
    }


def remove_partial_outputs(paths: StorePaths) -> None:
    """What models and jobs cut short by a crash left (see ``outputs.leftovers``): removed where
    proven ours, left alone otherwise."""
    for parent in (paths.models, paths.directory / "jobs"):
        clean_up_after_killed_runs(parent)


class Recorder:
    """Backend events -> store rows and log lines (the driver is the only writer of the store)."""

    def __init__(self, store: ResultsStore, log: SweepLog):
        self.store, self.log, self.ran = store, log, 0

    def started(self, job: Job, where: str) -> None:
        self.store.mark_running(job.hash, where, time.time())
        self.log.detail(f"start  {job.hash} {job.label()} on {where}")

    def finished(self, job: Job, record: dict) -> None:
        self.ran += 1
        retries = record.get("tries", 1) - 1  # a backend's own reruns (Ray's, after a lost worker)
        if retries > 0:
            self.store.add_attempts(job.hash, retries)
            self.log.info(f"retry  {job.hash} {job.label()}: started {retries + 1} times (a worker was lost)")
        if "error" in record:
            self.store.mark_failed(job.hash, record["error"], time.time())
            self.log.info(f"FAILED {job.hash} {job.label()}: {record['error']}")
            if record.get("traceback"):
                self.log.detail(record["traceback"].rstrip())
        else:
            self.store.mark_done(job.hash, record)
            self.log.info(f"done   {job.hash} {job.label()}: {outcome(record)}")
        self.log.job_done()


def outcome(record: dict) -> str:
    m, seconds = record["metrics"], record["timings"]["job"]
    return (
        f"clean {m['clean_acc_before']:.4f} -> {m['clean_acc_after']:.4f}, ASR {m['asr_before']:.4f} -> "
        f"{m['asr_after']:.4f}, DER {m['der']:.4f} ({seconds:.1f} s on {record.get('worker', '?')})"
    )


def make_backend(options: SweepRunConfig, jobs: list[Job]):
    """Where the jobs run, with ``why`` (the log's first line): Ray, or local slots (`local_slots`)."""
    from rnp_fast.sweep.backends import InProcess, LocalWorkers, RayBackend

    if options.backend == "ray":
        return RayBackend(options.address, options.jobs_per_device or 1, options.max_retries)
    devices, parallelism = local_slots(options.gpus, options.jobs_per_device, jobs)
    why = f"{len(devices)} job(s) at once, one torch thread each: {parallelism.reason}"
    return InProcess(devices[0], why) if len(devices) == 1 else LocalWorkers(devices, why)


def local_slots(gpus: int | None, jobs_per_device: int | None, jobs: list[Job]) -> tuple[list[str], Parallelism]:
    """One device per worker slot, consecutive slots on different GPUs; without a GPU, one slot
    per core (or ``jobs_per_device``), as many as fit in memory (`rnp_fast.capacity`)."""
    import torch

    available = torch.cuda.device_count()
    gpus = available if gpus is None else gpus
    if gpus > available:
        raise UserError(f"--gpus {gpus}: only {available} CUDA device(s) visible")
    device = "cuda" if gpus else "cpu"
    per_job = max((job_memory(model, data, device) for model, data in distinct_shapes(jobs)), default=0)
    parallelism = decide(jobs_per_device, available_cores(), len(jobs), per_job, available_memory(), gpus)
    if gpus == 0:
        return ["cpu"] * parallelism.jobs, parallelism
    return [f"cuda:{slot % gpus}" for slot in range(parallelism.jobs)], parallelism


def distinct_shapes(jobs: list[Job]) -> list[tuple]:
    """(model, data) of the jobs, once per setting that changes a job's memory."""
    shapes = {}
    for job in jobs:
        key = (job.model.arch, job.model.width, job.data.dataset, job.data.data_dir, job.data.image_size)
        shapes.setdefault(key + (job.data.batch_size,), (job.model, job.data))
    return list(shapes.values())
