"""The results store: one SQLite row per job, every change of state in its own transaction.

Status goes pending -> running -> done | failed. Rows are only ever written by the sweep's driver
process (workers and Ray tasks hand their results back to it), and the driver holds an exclusive
lock on the store directory, so a row marked running when a driver starts belongs to a run that
died: it goes back to pending. With WAL and synchronous=FULL a committed row survives ``kill -9``
(and a power cut), so a crash loses at most the jobs that were running.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sqlite3
from contextlib import contextmanager
from pathlib import Path

from rnp_fast.errors import UserError
from rnp_fast.outputs import claim_directory, json_text
from rnp_fast.sweep.job import Job

DATABASE = "results.sqlite"
LOCK = ".sweep.lock"
STATUSES = ("pending", "running", "done", "failed")
JSON_COLUMNS = ("config", "varied", "metrics", "timings", "versions")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    hash        TEXT PRIMARY KEY,          -- of the job's configuration: no job is stored twice
    train_hash  TEXT NOT NULL,             -- of its training configuration: models/<train_hash>/
    sweep       TEXT NOT NULL,             -- name of the sweep that first added it
    config      TEXT NOT NULL,             -- JSON, every setting by section
    varied      TEXT NOT NULL,             -- JSON, its value on each axis
    status      TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempts    INTEGER NOT NULL DEFAULT 0, -- runs started: hand-outs, and a backend's own retries
    metrics     TEXT,                      -- JSON, accuracies and ASR before/after, DER, ...
    timings     TEXT,                      -- JSON, seconds per stage
    device      TEXT,
    threads     INTEGER,                   -- torch's intra-op threads the job ran with
    versions    TEXT,                      -- JSON
    worker      TEXT,
    error       TEXT,
    created_at  REAL NOT NULL,             -- Unix time
    started_at  REAL,
    finished_at REAL
)
"""

# Columns added after stores existed: added to an older store's table when the driver opens it.
LATER_COLUMNS = {"threads": "INTEGER"}
COLUMNS = frozenset(re.findall(r"^\s{4}(\w+)\s", SCHEMA, re.M))
# SQLite's header field for "which application's file is this" (PRAGMA application_id): "RNPF".
# Written when a store is created (before WAL, so that it lies in the main file at once).
APPLICATION_ID = 0x524E5046


class ResultsStore:
    """``ResultsStore(directory)`` for the driver; ``read_only=True`` for readers (``report``), which
    then never wait on, nor block, a running sweep (WAL lets readers and the writer overlap)."""

    def __init__(self, directory: str | Path, read_only: bool = False):
        self.directory = Path(directory)
        self.path = self.directory / DATABASE
        if read_only:
            self.connection = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
        else:
            check_database(self.path)  # never a statement on a database rnp-fast did not create
            self.directory.mkdir(parents=True, exist_ok=True)
            self.connection = sqlite3.connect(self.path, timeout=60)
            if self.connection.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                self.connection.execute(f"PRAGMA application_id={APPLICATION_ID}")  # new, or an old store of ours
            self.connection.execute("PRAGMA journal_mode=WAL")  # stored in the file: readers get it too
            self.connection.execute("PRAGMA synchronous=FULL")
            with self.connection:
                self.connection.execute(SCHEMA)
                add_later_columns(self.connection)
        self.connection.row_factory = sqlite3.Row

    def close(self) -> None:
        self.connection.close()

    def add_jobs(self, jobs: list[Job], sweep: str, now: float) -> int:
        """Insert the jobs not stored yet as pending; returns how many were new."""
        rows = [
            (job.hash, job.train_hash, sweep, dumps(job.config()), dumps(job.varied), "pending", now) for job in jobs
        ]
        with self.connection:
            before = self.connection.total_changes
            self.connection.executemany(
                "INSERT OR IGNORE INTO jobs (hash, train_hash, sweep, config, varied, status, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            return self.connection.total_changes - before

    def statuses(self) -> dict[str, str]:
        return dict(self.connection.execute("SELECT hash, status FROM jobs").fetchall())

    def requeue(self, status: str, hashes: list[str] | None = None) -> int:
        """Set jobs of ``status`` (optionally only ``hashes``) back to pending; returns the count."""
        query = "UPDATE jobs SET status = 'pending', worker = NULL WHERE status = ?"
        with self.connection:
            if hashes is None:
                return self.connection.execute(query, (status,)).rowcount
            return sum(self.connection.execute(query + " AND hash = ?", (status, h)).rowcount for h in hashes)

    def mark_running(self, job_hash: str, worker: str, now: float) -> None:
        with self.connection:
            self.connection.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, worker = ?, started_at = ?, "
                "finished_at = NULL, error = NULL WHERE hash = ?",
                (worker, now, job_hash),
            )

    def add_attempts(self, job_hash: str, count: int) -> None:
        """Runs a backend started on its own (Ray's retries after a lost worker)."""
        with self.connection:
            self.connection.execute("UPDATE jobs SET attempts = attempts + ? WHERE hash = ?", (count, job_hash))

    def mark_done(self, job_hash: str, record: dict) -> None:
        with self.connection:
            self.connection.execute(
                "UPDATE jobs SET status = 'done', metrics = ?, timings = ?, device = ?, threads = ?, versions = ?, "
                "worker = ?, started_at = ?, finished_at = ?, error = NULL WHERE hash = ?",
                (
                    dumps(record["metrics"]),
                    dumps(record["timings"]),
                    record["device"],
                    record.get("threads"),
                    dumps(record["versions"]),
                    record.get("worker"),
                    record["started_at"],
                    record["finished_at"],
                    job_hash,
                ),
            )

    def mark_failed(self, job_hash: str, error: str, now: float) -> None:
        with self.connection:
            self.connection.execute(
                "UPDATE jobs SET status = 'failed', error = ?, finished_at = ? WHERE hash = ?",
                (error, now, job_hash),
            )

    def rows(self, status: str | None = None) -> list[dict]:
        """Rows as dicts, JSON columns decoded, in the order jobs were added."""
        query = "SELECT * FROM jobs" + (" WHERE status = ?" if status else "") + " ORDER BY rowid"
        return [decode(row) for row in self.connection.execute(query, (status,) if status else ())]

    def counts(self) -> dict[str, int]:
        found = dict(self.connection.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
        return {status: found.get(status, 0) for status in STATUSES}


class NotAStore(UserError):
    """A results.sqlite that rnp-fast did not create: never opened for writing."""


def check_database(path: Path) -> None:
    """``path`` must be missing or a results store rnp-fast created: its application id says so, or
    (a store from before ids were written) its one table is ``jobs`` with our columns. Inspected
    read-only and immutable (no journal, lock or -shm file is created beside the user's file)."""
    if not os.path.lexists(path):
        return
    why = database_mismatch(path)
    if why is not None:
        raise NotAStore(
            f"{path} is not an rnp-fast results store ({why}); rnp-fast never writes to it: give a sweep's "
            "--store folder (a new folder for a new sweep)"
        )


def database_mismatch(path: Path) -> str | None:
    """Why ``path`` is not one of our stores (None: it is)."""
    if path.is_symlink() or not path.is_file():
        return "not a plain file"
    # immutable: the file is read as it lies on disk; no lock, journal or -shm is touched or made. Our
    # stores write their id before switching to WAL, so it is in the main file from the start.
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
        try:
            if connection.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID:
                return None
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            columns = {row[1] for row in connection.execute("PRAGMA table_info(jobs)")}
        finally:
            connection.close()
    except sqlite3.DatabaseError as error:
        return f"not an SQLite database: {error}"
    if tables != {"jobs"} or not (COLUMNS - set(LATER_COLUMNS) <= columns <= COLUMNS):
        shown = ", ".join(sorted(tables)[:4]) or "none"
        return f"another application's database: tables {shown}"
    return None


def is_old_store(directory: Path) -> bool:
    """An unmarked folder holding a results store of ours (made before stores were marked)."""
    return (directory / DATABASE).is_file() and database_mismatch(directory / DATABASE) is None


def add_later_columns(connection: sqlite3.Connection) -> None:
    present = {row[1] for row in connection.execute("PRAGMA table_info(jobs)")}
    for name, kind in LATER_COLUMNS.items():
        if name not in present:
            connection.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")


def dumps(value) -> str:
    return json_text(value, indent=None, sort_keys=True).rstrip("\n")  # the one JSON writer, strict


def decode(row: sqlite3.Row) -> dict:
    values = dict(row)
    for column in JSON_COLUMNS:
        if values[column] is not None:
            values[column] = json.loads(values[column])
    return values


def open_existing(store: str | Path) -> ResultsStore:
    """A store to read (``report``): the directory, or its results.sqlite."""
    path = Path(store)
    directory = path.parent if path.name == DATABASE else path
    if not (directory / DATABASE).is_file():
        raise UserError(f"{store}: no sweep results here (expected {directory / DATABASE})")
    check_database(directory / DATABASE)
    try:
        store = ResultsStore(directory, read_only=True)
        store.counts()  # reads the table: fails here, not later, on a file that is not a store
        return store
    except sqlite3.DatabaseError as error:
        raise UserError(f"{directory / DATABASE}: not a results store ({error})") from None


@contextmanager
def exclusive(directory: Path):
    """Hold the store for one driver at a time. The kernel drops the lock when its process dies,
    however it dies, so a killed sweep never leaves the store locked. The store is marked as
    ours first (``outputs``), so the lock file never makes it look like a stranger's folder."""
    claim_directory(directory, "sweep store")
    with open(directory / LOCK, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise UserError(f"{directory}: another sweep is running on this store (pid {owner})") from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield
