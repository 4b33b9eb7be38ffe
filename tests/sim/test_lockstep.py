"""Runs simulated together are the runs simulated alone, shared only while they agree."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.same_run import assert_same_run

from balloonist.errors import ConfigError
from balloonist.model import Decision, Snapshot
from balloonist.policy import Policy
from balloonist.sim import lockstep, runner
from balloonist.sim.instant import MoveModel
from balloonist.sim.scenario import Scenario, load_scenario

# Guests that grow, shrink and idle: static and mom decide differently within a few
# periods, and every period's balloons move.
HOST = Path(__file__).parent / "bound_hosts" / "growth.toml"


class _Switch:
    """Decides as ``before`` until ``at_s``, then as ``after``: a run that forks late."""

    def __init__(self, before: Policy, after: Policy, at_s: float) -> None:
        self._before, self._after, self._at_s = before, after, at_s

    @property
    def name(self) -> str:
        return "switch"

    def decide(self, snapshot: Snapshot) -> Decision:
        later = self._after.decide(snapshot)  # both see every snapshot, as alone
        earlier = self._before.decide(snapshot)
        return earlier if snapshot.time_s < self._at_s else later


def _policies(scenario: Scenario, switch_at_s: float) -> dict[str, Policy]:
    return {
        "static": runner.build_policy(scenario, "static"),
        "static-again": runner.build_policy(scenario, "static"),
        "mom": runner.build_policy(scenario, "mom"),
        "switch": _Switch(
            runner.build_policy(scenario, "static"),
            runner.build_policy(scenario, "mom"),
            switch_at_s,
        ),
    }


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return load_scenario(HOST)


def test_runs_together_are_the_runs_alone(
    scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    switch_at_s = scenario.period_s * (scenario.periods // 2)
    forks: list[list[str]] = []
    real_fork = lockstep._fork

    def counted(branch: lockstep._Branch, names: list[str], shared: dict[int, object]) -> object:
        forks.append(names)
        return real_fork(branch, names, shared)

    monkeypatch.setattr(lockstep, "_fork", counted)
    together = lockstep.simulate_together(
        scenario, _policies(scenario, switch_at_s), MoveModel.PACED, check_every_period=True
    )
    # static and its twin never part; mom parts early; the switch parts at its time
    assert forks == [["mom"], ["switch"]]
    for name, policy in _policies(scenario, switch_at_s).items():
        alone = lockstep.simulate_together(scenario, {name: policy}, MoveModel.PACED)[name]
        assert_same_run(together[name], alone)
    assert together["switch"].summary() != together["static"].summary()
    assert together["switch"].summary() != together["mom"].summary()


def test_progress_follows_the_first_policys_run(scenario: Scenario) -> None:
    heard: list[int] = []
    lockstep.simulate_together(
        scenario,
        {"mom": runner.build_policy(scenario, "mom"), **_policies(scenario, 0.0)},
        MoveModel.PACED,
        progress=lambda p: heard.append(p.period),
    )
    assert heard == list(range(1, scenario.periods + 1))


def test_the_bounds_together_are_the_bounds_alone(scenario: Scenario) -> None:
    together = runner.run_bounds(scenario, ("oracle", "oracle-fair"))
    for name in ("oracle", "oracle-fair"):
        assert_same_run(together[name], runner.run_scenario(scenario, policy_name=name))


def test_only_bounds_run_as_bounds(scenario: Scenario) -> None:
    with pytest.raises(ConfigError, match="'mom' is not a bound"):
        runner.run_bounds(scenario, ("oracle", "mom"))
