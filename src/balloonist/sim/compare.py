"""One scenario under several policies, each run in its own process.

The runs are independent and the simulator is seeded, so a run's result does not
depend on which process ran it (``tests/test_compare.py`` checks a parallel run against
a serial one); processes buy wall time only. Workers report their progress to the
parent through a pipe, a few lines a run, and the parent hands it to ``progress``.

A process that dies (killed, out of memory) breaks the whole pool: every run not yet
finished fails alike, and the pool ends the other workers. Each worker marks when its
run starts and ends, so the error names the runs that were under way when it happened.

The runner is a parameter so callers (and tests) can put something cheaper in place
of the simulator; it must be picklable (a module-level function, or an instance of a
module-level class) to reach the workers.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, MutableSequence, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.queues import SimpleQueue
from typing import Final, Protocol

from balloonist.errors import WorkerError
from balloonist.sim.result import Progress, SimResult
from balloonist.sim.scenario import Scenario

__all__ = ["PolicyProgress", "Runner", "run_policies"]

#: Reports per run at most: enough for a smooth bar, few enough to cost nothing.
REPORTS_PER_RUN: Final = 100

#: How often the parent looks for workers' reports while it waits for their results.
_POLL_S: Final = 0.1


class Runner(Protocol):
    """The simulator as its callers see it (``balloonist.sim.runner.run_scenario``)."""

    def __call__(
        self,
        scenario: Scenario,
        *,
        policy_name: str | None = None,
        progress: Callable[[Progress], None] | None = None,
    ) -> SimResult: ...


@dataclass(frozen=True)
class PolicyProgress:
    """One policy's run has finished ``period`` of its ``periods``."""

    policy: str
    period: int
    periods: int


PolicyProgressCallback = Callable[[PolicyProgress], None]


class _Reporter:
    """A runner's progress callback that passes on one period in each hundredth."""

    def __init__(self, policy: str, send: PolicyProgressCallback) -> None:
        self._policy = policy
        self._send = send
        self._last_step = -1

    def __call__(self, progress: Progress) -> None:
        step = REPORTS_PER_RUN * progress.period // progress.periods
        if step != self._last_step or progress.period == progress.periods:
            self._last_step = step
            self._send(PolicyProgress(self._policy, progress.period, progress.periods))


def run_policies(
    scenario: Scenario,
    names: Sequence[str],
    *,
    jobs: int,
    progress: PolicyProgressCallback | None = None,
    runner: Runner | None = None,
) -> dict[str, SimResult]:
    """Run ``scenario`` once under each policy in ``names``; results in that order.

    At most ``jobs`` processes (and no more than the machine's processors or the
    policies) run at once; with one, the runs are made here, one after another. The
    first error a run raises is raised here, once the runs under way have stopped.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if len(set(names)) != len(names):
        raise ValueError(f"policy names must be distinct, got {list(names)}")
    run = runner if runner is not None else _default_runner()
    workers = min(jobs, len(names), os.cpu_count() or 1)
    if workers <= 1:
        return {
            name: run(
                scenario,
                policy_name=name,
                progress=_Reporter(name, progress) if progress is not None else None,
            )
            for name in names
        }
    return _run_parallel(scenario, names, workers=workers, progress=progress, runner=run)


def _default_runner() -> Runner:
    # Imported late: the engine is heavy (numba), and callers may bring their own.
    from balloonist.sim.runner import run_scenario

    return run_scenario


def _run_parallel(
    scenario: Scenario,
    names: Sequence[str],
    *,
    workers: int,
    progress: PolicyProgressCallback | None,
    runner: Runner,
) -> dict[str, SimResult]:
    context = multiprocessing.get_context()
    # A SimpleQueue writes straight to its pipe (no feeder thread), so a run's last
    # report is in the pipe before its result is sent, and the final drain sees it.
    reports: SimpleQueue[PolicyProgress] | None = (
        context.SimpleQueue() if progress is not None else None
    )
    # Per run: _NOT_STARTED, _RUNNING or _FINISHED, written by the worker running it.
    states = context.Array("b", len(names), lock=False)
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(reports, states),
    )
    try:
        futures = {
            pool.submit(_run_in_worker, runner, scenario, name, i): name
            for i, name in enumerate(names)
        }
        pending: set[Future[SimResult]] = set(futures)
        while pending:
            done, pending = wait(pending, timeout=_POLL_S, return_when=FIRST_COMPLETED)
            _drain(reports, progress)
            # In submission order, so which error is raised does not depend on timing.
            for future in (f for f in futures if f in done):
                _raise_failure(future, names, states)
        _drain(reports, progress)
        return {futures[f]: f.result() for f in futures}
    finally:
        # On an error (or Ctrl-C) the runs not yet started never start.
        pool.shutdown(wait=True, cancel_futures=True)
        if reports is not None:
            reports.close()


def _raise_failure(future: Future[SimResult], names: Sequence[str], states: Sequence[int]) -> None:
    exc = future.exception()
    if isinstance(exc, BrokenProcessPool):
        # The runs under way when the pool broke: one of them died, and the pool ended
        # the others. A worker that died before marking its start leaves none.
        running = tuple(n for n, state in zip(names, states, strict=True) if state == _RUNNING)
        if len(running) == 1:
            what = f"the process running policy {running[0]!r} died"
        elif running:
            listed = ", ".join(repr(n) for n in running)
            what = f"a process running one of the policies {listed} died"
        else:
            what = "a worker process died before its run began"
        raise WorkerError(f"{what}: {exc}", policies=running)
    if exc is not None:
        raise exc


def _drain(
    reports: SimpleQueue[PolicyProgress] | None, progress: PolicyProgressCallback | None
) -> None:
    if reports is None or progress is None:
        return
    while not reports.empty():
        progress(reports.get())


# ---------------------------------------------------------------------------------------
# In the worker processes

#: Run states in the shared array: the parent reads them when a worker dies.
_NOT_STARTED: Final = 0
_RUNNING: Final = 1
_FINISHED: Final = 2

#: The worker's end of the report pipe and the shared run states, set once when the
#: worker starts.
_reports: SimpleQueue[PolicyProgress] | None = None
_states: MutableSequence[int] | None = None


def _init_worker(reports: SimpleQueue[PolicyProgress] | None, states: MutableSequence[int]) -> None:
    global _reports, _states  # noqa: PLW0603 - a worker's state, set at its start
    _reports = reports
    _states = states
    # Ctrl-C reaches the whole process group: it ends a worker quietly (no traceback
    # of its own), and the parent, interrupted too, reports it once.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run_in_worker(runner: Runner, scenario: Scenario, name: str, index: int) -> SimResult:
    assert _states is not None, "the pool's initializer sets the run states"
    reporter = _Reporter(name, _reports.put) if _reports is not None else None
    _states[index] = _RUNNING
    try:
        return runner(scenario, policy_name=name, progress=reporter)
    finally:
        _states[index] = _FINISHED
