"""Long-lived worker processes on this machine, one per slot: the sweep's local workers and the
repeated defense's seeds run in them (`sweep.backends`, `repeats`).

A slot is the device its worker uses (``cpu``, ``cuda:1``): each worker claims one when it
starts and keeps it (`slot`), so consecutive slots can sit on different GPUs. Workers are started
with ``spawn``, not ``fork``: forking a process that has started torch's threads (or CUDA) is
unsafe (and a spawned worker imports the caller's main script: from Python, its work must sit
under ``if __name__ == "__main__":``). They live as long as the pool, so what a job loads or
compiles stays warm for the next.

Workers never outlive their driver: on Linux each asks the kernel to kill it when the driver
dies (``PR_SET_PDEATHSIG``), so a driver killed with SIGKILL leaves no worker writing into its
outputs, and `WorkerPool.close` kills those still running (after Ctrl-C or SIGTERM, whose
handler requeues their jobs: finishing them would race with the next run).
"""

from __future__ import annotations

import concurrent.futures as futures
import ctypes
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool

from rnp_fast.errors import UserError

PR_SET_PDEATHSIG = 1  # prctl(2)
_SLOT = "cpu"  # the device of this worker process, set once when it starts


def slot() -> str:
    """This worker's device (``cpu`` outside a pool)."""
    return _SLOT


def start_worker(slots, driver: int) -> None:
    """A worker's initializer: die with the driver, then claim a slot."""
    global _SLOT
    die_with_parent(driver)
    _SLOT = slots.get()


def die_with_parent(driver: int) -> None:
    """SIGKILL this process when its parent dies (Linux; elsewhere nothing). The parent may have
    died before the request was made: then exit now."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != driver:
        os._exit(1)


class WorkerPool:
    """One worker process per slot of ``slots``; started at the first ``submit``, and started
    afresh when a worker has died (e.g. killed for memory), so the next job still runs."""

    def __init__(self, slots: list[str]):
        self.slots = slots
        self.executor: futures.ProcessPoolExecutor | None = None
        self.submitted: list[futures.Future] = []

    def start(self) -> futures.ProcessPoolExecutor:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        for device in self.slots:
            queue.put(device)
        return futures.ProcessPoolExecutor(
            len(self.slots), mp_context=context, initializer=start_worker, initargs=(queue, os.getpid())
        )

    def submit(self, function: Callable, *args) -> futures.Future:
        """``function(*args)`` in a worker (``function`` must be importable: a module's top level)."""
        if self.executor is None:
            self.executor = self.start()
        try:
            future = self.executor.submit(function, *args)
        except BrokenProcessPool:  # a worker died: the others went with the pool, start afresh
            self.kill_workers()
            self.executor = self.start()
            future = self.executor.submit(function, *args)
        self.submitted = [f for f in self.submitted if not f.done()] + [future]
        return future

    def close(self) -> None:
        """Stop the workers: idle ones at once; busy ones (Ctrl-C, an error in the driver) are
        killed, their work abandoned, without waiting for it."""
        if self.executor is None:
            return
        if any(not future.done() for future in self.submitted):
            self.kill_workers()
            self.executor.shutdown(wait=False, cancel_futures=True)
        else:
            self.executor.shutdown(wait=True)
        self.executor, self.submitted = None, []

    def kill_workers(self) -> None:
        # ProcessPoolExecutor can only wait for its workers (Python < 3.14 has no terminate_workers)
        for process in list(getattr(self.executor, "_processes", {}).values()):
            if process.is_alive():
                process.kill()


def first_done(in_flight) -> futures.Future:
    """Wait for one of ``in_flight``'s futures to finish; return it."""
    done, _ = futures.wait(in_flight, return_when=futures.FIRST_COMPLETED)
    return next(iter(done))


class WorkerDied(UserError):
    """A worker process ended without a result (killed for memory, a crash): one line, exit 1."""

    exit_code = 1


def worker_result(pending: dict):
    """The result of the first of ``pending``'s futures to finish (removed from it); the worker's
    own exception is raised as it was, a dead worker as `WorkerDied`."""
    future = first_done(pending)
    pending.pop(future)
    try:
        return future.result()
    except BrokenProcessPool as error:
        raise WorkerDied(
            f"a worker process died ({error}); if it ran out of memory, run fewer at once (--jobs-per-device); "
            'from Python, the calling script must run its work under `if __name__ == "__main__":`'
        ) from None
