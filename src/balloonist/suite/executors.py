"""Where the suite's tasks run: one small port, and adapters for a process pool and Ray.

The suite hands an :class:`Executor` a module-level function and its tasks, and gets
the results back in task order; which processes or machines ran them, and in what
order they finished, does not show in the results.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import signal
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

__all__ = [
    "DoneCallback",
    "Executor",
    "ProcessPoolAdapter",
    "RayAdapter",
    "SerialExecutor",
    "TaskDoneCallback",
    "ray_available",
]

T = TypeVar("T")
R = TypeVar("R")

#: Called with (runs done, runs in all) as a suite goes.
DoneCallback = Callable[[int, int], None]
#: Called with a task's index in the list given to ``map`` as it finishes.
TaskDoneCallback = Callable[[int], None]


class Executor(Protocol):
    def map(self, fn: Callable[[T], R], tasks: Sequence[T], on_done: TaskDoneCallback) -> list[R]:
        """``[fn(t) for t in tasks]``, run somewhere, in task order; tasks start in order."""
        ...


class SerialExecutor:
    """In this process, one task after another (tests, ``--jobs 1``)."""

    def map(self, fn: Callable[[T], R], tasks: Sequence[T], on_done: TaskDoneCallback) -> list[R]:
        results: list[R] = []
        for i, task in enumerate(tasks):
            results.append(fn(task))
            on_done(i)
        return results


def _ignore_sigint() -> None:
    # Ctrl-C goes to the whole process group; the parent alone decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ProcessPoolAdapter:
    """``jobs`` worker processes on this machine.

    Workers are spawned, not forked: the parent may be running a progress thread, and
    a fork copies locks held by other threads.
    """

    def __init__(self, jobs: int) -> None:
        if jobs < 1:
            raise ValueError("jobs must be >= 1")
        self._jobs = jobs

    def map(self, fn: Callable[[T], R], tasks: Sequence[T], on_done: TaskDoneCallback) -> list[R]:
        results: dict[int, R] = {}
        pool = cf.ProcessPoolExecutor(
            max_workers=min(self._jobs, max(1, len(tasks))),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_ignore_sigint,
        )
        try:
            futures = {pool.submit(fn, task): i for i, task in enumerate(tasks)}
            for future in cf.as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                on_done(i)
        except BaseException:
            # Ctrl-C or a failed task: drop what is queued and stop what runs, now.
            processes = list((pool._processes or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.terminate()
            raise
        pool.shutdown(wait=True)
        return [results[i] for i in range(len(tasks))]


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


class RayAdapter:
    """The tasks as Ray tasks: on the cluster at ``address``, or a local instance of
    ``jobs`` CPUs when ``address`` is None. Ray is started here and shut down after,
    unless the caller had already connected."""

    def __init__(self, address: str | None, jobs: int) -> None:
        self._address = address
        self._jobs = jobs

    def map(self, fn: Callable[[T], R], tasks: Sequence[T], on_done: TaskDoneCallback) -> list[R]:
        import ray

        started = not ray.is_initialized()
        if started:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self._address is None:
                kwargs["num_cpus"] = self._jobs
            ray.init(address=self._address, **kwargs)
        refs: list[Any] = []
        try:
            remote = ray.remote(num_cpus=1, max_retries=0)(fn)
            refs = [remote.remote(task) for task in tasks]
            index = {ref: i for i, ref in enumerate(refs)}
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    on_done(index[ref])
            results: list[R] = ray.get(refs)
            return results
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
        finally:
            if started:
                ray.shutdown()
