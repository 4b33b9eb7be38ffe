"""Wiring for a simulated run: scenario -> machine, policy, scheduler -> SimResult.

This is the one place where the simulator's parts are put together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from balloonist.errors import ConfigError
from balloonist.policy import Policy
from balloonist.sim.instant import MoveModel
from balloonist.sim.lockstep import ProgressCallback, simulate_together
from balloonist.sim.names import ORACLE_NAMES, POLICY_NAMES
from balloonist.sim.result import SimResult
from balloonist.sim.scenario import Scenario
from balloonist.sim.valuation import HostPaging, ModeValues
from balloonist.units import PAGE_SIZE_BYTES

if TYPE_CHECKING:
    from balloonist.sim.oracle import OraclePolicy

__all__ = ["ProgressCallback", "build_policy", "run_bounds", "run_scenario"]


def build_policy(scenario: Scenario, name: str) -> Policy:
    if name not in POLICY_NAMES:
        raise ConfigError(f"unknown policy {name!r} (choose from {', '.join(POLICY_NAMES)})")
    if name in ORACLE_NAMES:
        return _oracle(scenario, name, host_paging=HostPaging.CONFINED)
    from balloonist.policy.registry import make_policy

    return make_policy(name, tax_rate=scenario.tax_rate)


def _oracle(
    scenario: Scenario, name: str, *, host_paging: HostPaging, modes: ModeValues | None = None
) -> OraclePolicy:
    from balloonist.sim.oracle import OraclePolicy

    return OraclePolicy(
        scenario.guests,
        scenario.costs,
        period_s=scenario.period_s,
        slices_per_period=scenario.slices_per_period,
        fair=name == "oracle-fair",
        host_swap_pages=scenario.host_swap_bytes // PAGE_SIZE_BYTES,
        host_paging=host_paging,
        modes=modes,
        until_s=scenario.duration_s,
    )


def run_scenario(
    scenario: Scenario,
    *,
    policy_name: str | None = None,
    progress: ProgressCallback | None = None,
    check_every_period: bool = False,
) -> SimResult:
    """Simulate ``scenario`` under a policy (the scenario's own unless overridden)."""
    policy_used = policy_name or scenario.policy_name
    if policy_used in ORACLE_NAMES:
        return run_bounds(
            scenario,
            (policy_used,),
            progress=progress,
            check_every_period=check_every_period,
        )[policy_used]
    policy = build_policy(scenario, policy_used)
    return _simulate(scenario, policy, policy_used, MoveModel.PACED, progress, check_every_period)


def run_bounds(
    scenario: Scenario,
    names: Sequence[str],
    *,
    progress: ProgressCallback | None = None,
    check_every_period: bool = False,
) -> dict[str, SimResult]:
    """The bounds ``names`` (of ``ORACLE_NAMES``) on ``scenario``, each the best of
    its whole schedules where they differ.

    A bound knows the whole schedule in advance, so it may run several and keep the
    best: one that may leave a guest to the host's paging where it can never hold its
    set ballooned, one that may wherever that models higher, and one that only
    balloons. Host paging's steady-state curve misses the switch (the random victims
    take a while to find the kernel's pages), so no one scope wins everywhere: on
    suite seed 1's scenario 57 every policy that ballooned beat the first schedule by
    1.3 %; on seed 7's scenario 27 ``proxmox`` beat the first and the last by 2.6 %,
    host paging a guest that could have held its set only by starving the other; on
    seed 7's scenario 83 the second schedule host-paged a scan through its last
    seconds and made 5 % less than the first. Where no schedule that may host-page
    does, each guest's modelled value at its allocation is its ballooned one, so those
    allocations are also the balloon-only schedule's best and it is not run.

    The bounds' schedules are simulated together (``sim/lockstep.py``): ``oracle`` and
    ``oracle-fair`` decide the same until the sharing rule binds, and the scopes until
    one host-pages, and they share the run up to there. ``progress`` hears of the
    first bound's first schedule.
    """
    from balloonist.sim.curves import CurveBook

    for n in names:
        if n not in ORACLE_NAMES:
            raise ConfigError(f"{n!r} is not a bound (choose from {', '.join(ORACLE_NAMES)})")
    # Every schedule values the same guests on the same snapshots until they part:
    # their curves are measured once, and each size valued once.
    modes = ModeValues(scenario.costs, CurveBook())
    scopes = [HostPaging.CONFINED]
    if scenario.host_swap_bytes > 0:
        scopes.append(HostPaging.ANYWHERE)
    # A bound's balloons move instantly and for free.
    first = {
        (n, scope): _oracle(scenario, n, host_paging=scope, modes=modes)
        for n in names
        for scope in scopes
    }
    runs = _simulate_schedules(scenario, first, progress, check_every_period)
    again = {
        (n, HostPaging.NEVER): _oracle(scenario, n, host_paging=HostPaging.NEVER, modes=modes)
        for n in names
        if any(first[n, scope].chose_host_paging for scope in scopes)
    }
    runs.update(_simulate_schedules(scenario, again, None, check_every_period))
    results: dict[str, SimResult] = {}
    for (n, _), run in runs.items():  # the first schedule wins a tie
        if n not in results or run.throughput_refs_per_s > results[n].throughput_refs_per_s:
            results[n] = run
    return results


def _simulate_schedules(
    scenario: Scenario,
    schedules: dict[tuple[str, HostPaging], OraclePolicy],
    progress: ProgressCallback | None,
    check_every_period: bool,
) -> dict[tuple[str, HostPaging], SimResult]:
    """Each bound's schedule's run, named for the bound."""
    runs = simulate_together(
        scenario,
        {f"{n} {scope.value}": policy for (n, scope), policy in schedules.items()},
        MoveModel.INSTANT,
        progress=progress,
        check_every_period=check_every_period,
    )
    return {
        (n, scope): dataclasses.replace(runs[f"{n} {scope.value}"], policy=n)
        for n, scope in schedules
    }


def _simulate(
    scenario: Scenario,
    policy: Policy,
    name: str,
    moves: MoveModel,
    progress: ProgressCallback | None,
    check_every_period: bool,
) -> SimResult:
    return simulate_together(
        scenario,
        {name: policy},
        moves,
        progress=progress,
        check_every_period=check_every_period,
    )[name]
