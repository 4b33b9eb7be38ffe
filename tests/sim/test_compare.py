"""run_policies: the same results whichever process ran a policy; progress; failures."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.same_run import assert_same_run

from balloonist.errors import SimulationError, WorkerError
from balloonist.model import HostState
from balloonist.sim.compare import REPORTS_PER_RUN, PolicyProgress, run_policies
from balloonist.sim.result import GuestProgress, Progress, SimResult
from balloonist.sim.scenario import Scenario, scenario_from_dict

# Overcommitted (two 192MiB guests on 256MiB) with shared processors, so the policies
# disagree and both the memory and the CPU parts of the simulator draw random numbers.
TINY: dict[str, Any] = {
    "name": "tiny",
    "host": {"memory": "256MiB", "swap": "512MiB", "cpus": 2},
    "sim": {"duration_s": 8, "seed": 7},
    "costs": {"reference_s": 1e-4},
    "guests": [
        {
            "name": "zipf",
            "memory": "192MiB",
            "workload": {"kind": "zipf", "working_set": "160MiB", "skew": 0.8},
            "cpus": 2,
            "cpu_workload": {"kind": "parallel", "threads": 2, "work_per_round_cpu_s": 0.005},
        },
        {
            "name": "scan",
            "memory": "192MiB",
            "workload": {"kind": "scan", "working_set": "120MiB"},
            "cpus": 2,
        },
    ],
}
POLICIES = ("shares", "static", "mom")


def _tiny() -> Scenario:
    return scenario_from_dict(TINY, where="tiny", default_name="tiny")


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two processors for two workers")
def test_parallel_runs_equal_serial_runs_with_the_real_simulator() -> None:
    scenario = _tiny()
    serial = run_policies(scenario, POLICIES, jobs=1)
    parallel = run_policies(scenario, POLICIES, jobs=len(POLICIES))
    assert list(serial) == list(parallel) == list(POLICIES)
    for name in POLICIES:
        assert parallel[name].policy == name
        assert_same_run(serial[name], parallel[name])
    # The policies did differ, so equal results mean each ran the policy it was given.
    throughputs = {r.summary()["aggregate"]["throughput_refs_per_s"] for r in serial.values()}
    assert len(throughputs) == len(POLICIES)


# ---------------------------------------------------------------------------------------
# With a stand-in runner: module-level classes, so they pickle into the workers


def _empty_result(scenario: Scenario, policy: str) -> SimResult:
    n = scenario.periods
    zeros = np.zeros(n, dtype=np.int64)
    return SimResult(
        scenario=scenario.name,
        policy=policy,
        seed=scenario.seed,
        duration_s=scenario.duration_s,
        period_s=scenario.period_s,
        host_memory_bytes=scenario.host_memory_bytes,
        time_s=np.arange(1, n + 1, dtype=np.float64),
        host_free_bytes=zeros,
        host_swap_used_bytes=zeros,
        host_state=zeros,
        guests=(),
    )


#: How long a run in a test waits for another process's mark before giving up.
_MARK_DEADLINE_S = 60.0


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + _MARK_DEADLINE_S
    while not path.exists():
        assert time.monotonic() < deadline, f"no {path.name} within {_MARK_DEADLINE_S} s"
        time.sleep(0.01)


@dataclass
class CountingRunner:
    """Reports every period; fails for ``fail_for`` (raising, or killing its process).

    With ``marks`` (a directory) each run leaves ``<policy>.started`` and
    ``<policy>.done`` there, so runs in other processes can wait on each other: the
    failing run first waits for ``fail_after``, and the run of ``hold`` waits for a
    mark that never comes (until the pool ends its process, or the deadline).
    """

    fail_for: str | None = None
    die: bool = False
    marks: str | None = None
    fail_after: str | None = None
    hold: str | None = None

    def __call__(
        self,
        scenario: Scenario,
        *,
        policy_name: str | None = None,
        progress: Callable[[Progress], None] | None = None,
    ) -> SimResult:
        marks = Path(self.marks) if self.marks is not None else None
        if marks is not None:
            (marks / f"{policy_name}.started").touch()
        if policy_name == self.fail_for:
            if marks is not None and self.fail_after is not None:
                _wait_for(marks / self.fail_after)
            if self.die:
                os._exit(3)  # as the kernel's OOM killer would leave it: no exception
            raise SimulationError(f"broken invariant under {policy_name}")
        if marks is not None and policy_name == self.hold:
            _wait_for(marks / "never")
        for k in range(scenario.periods):
            if progress is not None:
                progress(_progress(k + 1, scenario.periods))
        if marks is not None:
            (marks / f"{policy_name}.done").touch()
        return _empty_result(scenario, policy_name or scenario.policy_name)


def _progress(period: int, periods: int) -> Progress:
    guest = GuestProgress("g", 1, 1, 1, 0, 1, 0.0, 0)
    return Progress(period, periods, float(period), 1, 1, HostState.HIGH, (guest,))


def _long(periods: int) -> Scenario:
    return dataclasses.replace(_tiny(), duration_s=float(periods))


@pytest.mark.parametrize("jobs", [1, 2])
def test_progress_reaches_the_end_of_every_run_in_at_most_a_hundred_reports(jobs: int) -> None:
    scenario = _long(1000)
    assert scenario.periods == 1000
    reports: list[PolicyProgress] = []
    results = run_policies(
        scenario, POLICIES, jobs=jobs, progress=reports.append, runner=CountingRunner()
    )
    assert [r.policy for r in results.values()] == list(POLICIES)
    for name in POLICIES:
        mine = [r.period for r in reports if r.policy == name]
        assert mine == sorted(mine)
        assert mine[-1] == 1000
        assert len(mine) <= REPORTS_PER_RUN + 1


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_runs_error_is_raised_to_the_caller(jobs: int) -> None:
    runner = CountingRunner(fail_for="static")
    with pytest.raises(SimulationError, match="broken invariant under static"):
        run_policies(_tiny(), POLICIES, jobs=jobs, runner=runner)


def test_a_worker_that_dies_is_an_error_naming_its_policy(tmp_path: Path) -> None:
    # mom's process dies once static's run is done: one run is under way when it does.
    runner = CountingRunner(fail_for="mom", die=True, marks=str(tmp_path), fail_after="static.done")
    with pytest.raises(WorkerError, match="running policy 'mom' died") as caught:
        run_policies(_tiny(), ("static", "mom"), jobs=2, runner=runner)
    assert caught.value.policies == ("mom",)


def test_a_worker_dying_beside_another_run_names_both(tmp_path: Path) -> None:
    # The pool cannot tell which of its processes died; the error names every run
    # under way (the pool ends the others), not whichever future came back first.
    runner = CountingRunner(
        fail_for="mom", die=True, marks=str(tmp_path), fail_after="static.started", hold="static"
    )
    with pytest.raises(WorkerError, match="one of the policies 'static', 'mom' died") as caught:
        run_policies(_tiny(), ("static", "mom"), jobs=2, runner=runner)
    assert caught.value.policies == ("static", "mom")


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="jobs"):
        run_policies(_tiny(), POLICIES, jobs=0, runner=CountingRunner())
    with pytest.raises(ValueError, match="distinct"):
        run_policies(_tiny(), ("mom", "mom"), jobs=2, runner=CountingRunner())
