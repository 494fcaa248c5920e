"""Running one job: train (or reuse) its backdoored model, defend it, return the record to store.

Runs wherever the backend puts it (the driver's process, a worker process, a Ray task); it never
touches the results store. Errors come back as data (``{"error": ...}``) so that every backend
reports them the same way and no exception has to cross a process boundary.
"""

from __future__ import annotations

import fcntl
import json
import time
import traceback
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from rnp_fast.outputs import writing_inside
from rnp_fast.provenance import versions
from rnp_fast.sweep.job import Job

MODEL_FILE = "model.safetensors"
PURIFIED_FILES = ("purified.safetensors", "purified.pth")
# Defense summary entries copied into the store's metrics column.
METRICS = (
    "clean_acc_before",
    "clean_acc_after",
    "asr_before",
    "asr_after",
    "clean_acc_full_before",
    "clean_acc_full_after",
    "robust_acc_before",
    "robust_acc_after",
    "der",
    "threshold",
    "pruned",
    "rule",
    "unlearning_stop_epoch",
    "clean_acc_full_drop",
    "clean_acc_drop",
    "verdict",
    "rule_warning",
)
COUNTED = METRICS[:8] + ("clean_acc_full_drop", "clean_acc_drop")  # each with its n and 95 % interval beside it


def run_job(job: Job, models_dir: Path, job_dir: Path, device: str, keep_purified: bool) -> dict:
    """The job's record: metrics, timings, device, threads, versions, start and end (Unix time); or
    its error."""
    with intra_op_threads(job.threads):
        record = run_job_here(job, models_dir, job_dir, device, keep_purified)
    return {**record, "threads": job.threads}


@contextmanager
def intra_op_threads(count: int):
    """torch's intra-op threads set to ``count`` for the job, the caller's restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_job_here(job: Job, models_dir: Path, job_dir: Path, device: str, keep_purified: bool) -> dict:
    started = time.time()
    try:
        with writing_inside(Path(models_dir).parent):  # the store's own writes (see outputs)
            model_path, trained = backdoored_model(job, Path(models_dir), device)
            summary = defend(job, model_path, Path(job_dir), device)
    except Exception as error:  # any failure is this job's, recorded in its row; the sweep goes on
        return {"error": one_line(error), "traceback": traceback.format_exc(), "started_at": started}
    if not keep_purified:
        for name in PURIFIED_FILES:
            (Path(job_dir) / name).unlink(missing_ok=True)
    metrics = {name: summary.get(name) for name in METRICS}
    for name in COUNTED:
        metrics.update({key: summary[key] for key in (f"{name}_n", f"{name}_ci95", f"{name}_reason") if key in summary})
    metrics.update(model_clean_acc=trained["clean_acc"], model_asr=trained["asr"])
    for name, key in (("model_clean_acc", "clean_acc"), ("model_asr", "asr")):  # models trained before: none
        counted = {f"{name}_{part}": trained.get(f"{key}_{part}") for part in ("n", "ci95")}
        metrics.update({column: value for column, value in counted.items() if value is not None})
    finished = time.time()
    timings = {
        **summary["timings"],
        "defense": summary["seconds"],
        "train": trained["seconds"] if trained["here"] else 0.0,
        "job": finished - started,
    }
    return {
        "metrics": metrics,
        "timings": timings,
        "device": summary["device"],
        "versions": versions(),
        "started_at": started,
        "finished_at": finished,
    }


def backdoored_model(job: Job, models_dir: Path, device: str) -> tuple[Path, dict]:
    """models/<train hash>/model.safetensors, trained here unless a job with the same training
    configuration already made it. The lock makes concurrent jobs of one model train it once."""
    from rnp_fast.train import train_backdoor

    directory = models_dir / job.train_hash
    with file_lock(models_dir / f"{job.train_hash}.lock"):
        here = not (directory / MODEL_FILE).is_file()
        if here:  # written atomically (RunDirectory): a killed training leaves no model behind
            engine = replace(job.engine, device=device, quiet=True)
            train_backdoor(str(directory), job.model, job.data, job.attack, job.train, engine, reuse=True)
    summary = read_json(directory / "summary.json")
    return directory / MODEL_FILE, {**summary, "here": here}


def defend(job: Job, model_path: Path, job_dir: Path, device: str) -> dict:
    from rnp_fast.defense import DefendJob, run_defense

    return run_defense(
        DefendJob(
            model_path=str(model_path),
            out=str(job_dir),
            model=job.model,
            data=job.data,
            attack=job.attack,
            rnp=job.rnp,
            engine=replace(job.engine, device=device, quiet=True),
        ),
        reuse=True,  # a sweep defends again and again in this process: compiled steps pay back
    )


@contextmanager
def file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, or its process dies
        yield


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def one_line(error: BaseException) -> str:
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
