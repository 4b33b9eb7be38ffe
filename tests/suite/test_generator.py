"""The generator: deterministic, independent of count, and covering what hosts see."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from balloonist.sim.scenario import Replacement, Scenario, scenario_from_dict
from balloonist.sim.workload import WorkloadKind
from balloonist.suite.generator import (
    SHAPES,
    GeneratedScenario,
    GeneratorParams,
    generate,
    generate_dicts,
    generate_one,
)
from balloonist.units import MIB

COUNT = 200


@pytest.fixture(scope="module")
def suite() -> list[GeneratedScenario]:
    return [generate_one(1, i) for i in range(COUNT)]


def test_same_seed_same_scenarios() -> None:
    assert generate(5, seed=7) == generate(5, seed=7)
    assert generate_dicts(5, seed=7) == generate_dicts(5, seed=7)


def test_other_seed_other_scenarios() -> None:
    assert generate_dicts(3, seed=1) != generate_dicts(3, seed=2)


def test_scenario_i_does_not_depend_on_count() -> None:
    assert generate_dicts(3, seed=4)[2] == generate_dicts(9, seed=4)[2]


def test_names() -> None:
    assert [s.name for s in generate(3, seed=5)] == ["suite-5-0", "suite-5-1", "suite-5-2"]


def test_every_dict_rebuilds_the_scenario(suite: list[GeneratedScenario]) -> None:
    for g in suite[:20]:
        again = scenario_from_dict(g.data, where="x", default_name="x")
        assert again == g.scenario


def _kinds(s: Scenario) -> set[WorkloadKind]:
    return {p.workload.kind for g in s.guests for p in g.plan.phases}


def test_coverage(suite: list[GeneratedScenario]) -> None:
    scenarios = [g.scenario for g in suite]
    guests = [g for s in scenarios for g in s.guests]
    assert set().union(*map(_kinds, scenarios)) == set(WorkloadKind)
    assert {g.replacement for g in guests} == set(Replacement)
    assert set(Counter(shape for g in suite for shape in g.shapes)) == set(SHAPES)
    counts = {len(s.guests) for s in scenarios}
    assert min(counts) == 2 and max(counts) == 16
    no_balloon = [s for s in scenarios if not all(g.spec.balloon for g in s.guests)]
    assert 0 < len(no_balloon) < COUNT / 2
    ratios = [
        max(g.spec.shares for g in s.guests) / min(g.spec.shares for g in s.guests)
        for s in scenarios
    ]
    assert min(ratios) == 1.0 and 7.0 <= max(ratios) <= 8.0 + 1e-9
    assert any(g.spec.min_bytes > 0 for g in guests)
    assert any((g.spec.max_bytes or g.spec.memory_bytes) < g.spec.memory_bytes for g in guests)
    skews = [
        p.workload.skew
        for g in guests
        for p in g.plan.phases
        if p.workload.kind == WorkloadKind.ZIPF
    ]
    assert 0.6 <= min(skews) < 0.7 and 1.3 < max(skews) <= 1.4


def test_sizes_and_overcommit(suite: list[GeneratedScenario]) -> None:
    for g in suite:
        s = g.scenario
        configured = sum(x.spec.memory_bytes for x in s.guests)
        assert 1.2 - 0.01 <= configured / s.host_memory_bytes <= 3.0 + 0.01
        assert s.host_swap_bytes >= configured
        assert 60 <= s.duration_s <= 180 and s.period_s == 1.0
        for guest in s.guests:
            assert 128 * MIB <= guest.spec.memory_bytes <= 4096 * MIB
            assert guest.spec.memory_bytes % MIB == 0


def test_phase_changes(suite: list[GeneratedScenario]) -> None:
    plans = [guest.plan for g in suite for guest in g.scenario.guests]
    # A drifting hot set: two active phases at different offsets.
    assert any(len({p.workload.offset_pages for p in plan.phases}) > 1 for plan in plans)
    # A jump: a later phase at least twice as large as the first, appearing at once.
    assert any(
        p.workload.ramp_s == 0
        and p.workload.working_set_pages >= 2 * plan.phases[0].workload.working_set_pages > 0
        for plan in plans
        for p in plan.phases[1:]
    )
    ramps = [p.workload.ramp_s for plan in plans for p in plan.phases]
    assert min(ramps) == 0.0 and 50.0 < max(ramps) <= 60.0


def test_working_sets_from_small_to_beyond_the_share(suite: list[GeneratedScenario]) -> None:
    fractions = []
    for g in suite:
        s = g.scenario
        total = sum(x.spec.shares for x in s.guests)
        for guest in s.guests:
            fair_pages = s.host_memory_bytes / 4096 * guest.spec.shares / total
            fractions += [
                p.workload.working_set_pages / fair_pages
                for p in guest.plan.phases
                if p.workload.working_set_pages
            ]
    assert min(fractions) < 0.2 and max(fractions) > 1.5


def test_cost_is_bounded(suite: list[GeneratedScenario]) -> None:
    params = GeneratorParams()
    assert max(g.estimated_refs for g in suite) <= params.max_estimated_refs
    for g in suite:
        active = sum(
            1
            for guest in g.scenario.guests
            if any(p.workload.kind != WorkloadKind.IDLE for p in guest.plan.phases)
        )
        assert active >= 1
        assert g.estimated_refs <= active * g.scenario.duration_s * params.hit_refs_per_s


def test_bad_params_are_refused() -> None:
    with pytest.raises(ValueError, match="guests_min"):
        GeneratorParams(guests_min=3, guests_max=2)
    with pytest.raises(ValueError, match="shape_weights"):
        GeneratorParams(shape_weights=(1.0,))
    assert math.isfinite(GeneratorParams().max_estimated_refs)
