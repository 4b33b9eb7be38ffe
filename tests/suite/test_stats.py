"""The statistics on hand-made records: ratios, wins and losses, sharing, double paging."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balloonist.errors import ConfigError
from balloonist.suite.records import RunRecord, join_slices, record_from_json, record_to_json
from balloonist.suite.stats import (
    MIN_BOUND_REFS_PER_S,
    PolicyStats,
    ratios,
    suite_stats,
    summary_json,
)


def rec(
    scenario: str,
    policy: str,
    guests: dict[str, float],
    *,
    double_paging: int = 0,
    ballooned: bool = True,
) -> RunRecord:
    return RunRecord(
        scenario=scenario,
        policy=policy,
        throughput_refs_per_s=sum(guests.values()),
        guest_names=tuple(guests),
        guest_throughput_refs_per_s=tuple(guests.values()),
        major_faults=0,
        double_paging_events=double_paging,
        host_swap_ins=0,
        every_guest_ballooned=ballooned,
        cpu_s=1.0,
    )


def by_policy(stats: tuple[PolicyStats, ...]) -> dict[str, PolicyStats]:
    return {s.policy: s for s in stats}


RECORDS = [
    rec("a", "oracle", {"x": 100.0, "y": 100.0}),
    rec("a", "static", {"x": 50.0, "y": 100.0}),
    rec("a", "shares", {"x": 100.0, "y": 80.0}, double_paging=3),
    rec("b", "oracle", {"x": 200.0, "y": 0.0}, ballooned=False),
    rec("b", "static", {"x": 100.0, "y": 0.0}, ballooned=False),
    rec("b", "shares", {"x": 99.5, "y": 0.0}, double_paging=5, ballooned=False),
    rec("c", "oracle", {"x": 0.0, "y": 0.0}),  # the bound did nothing: no ratio
    rec("c", "static", {"x": 0.0, "y": 0.0}),
    rec("c", "shares", {"x": 0.0, "y": 0.0}),
]


def test_relative_to_the_bound() -> None:
    stats = by_policy(suite_stats(RECORDS))
    static = stats["static"].relative[0]
    assert (static.bound, static.scenarios) == ("oracle", 2)
    assert static.worst == 0.5 and static.worst_scenario == "b"
    assert static.median == pytest.approx(0.625)
    assert static.p10 == pytest.approx(0.525)
    shares = stats["shares"].relative[0]
    assert shares.worst == pytest.approx(99.5 / 200) and shares.worst_scenario == "b"
    assert stats["oracle"].relative[0].median == 1.0


def test_wins_ties_losses() -> None:
    stats = by_policy(suite_stats(RECORDS))
    shares = {v.peer: v for v in stats["shares"].versus}
    # a: 180 vs 150 win; b: 99.5 vs 100 tie (within 1%); c: 0 vs 0 tie.
    assert (shares["static"].wins, shares["static"].ties, shares["static"].losses) == (1, 2, 0)
    assert shares["static"].at_least_as_good == 1.0
    assert (shares["oracle"].wins, shares["oracle"].ties, shares["oracle"].losses) == (0, 1, 2)
    assert shares["oracle"].at_least_as_good == pytest.approx(1 / 3)
    static = {v.peer: v for v in stats["static"].versus}
    assert (static["shares"].wins, static["shares"].ties, static["shares"].losses) == (0, 2, 1)


def test_sharing_check() -> None:
    stats = by_policy(suite_stats(RECORDS))
    # shares: a passes (x 100 >= 45, y 80 < 90 fails!) -> a fails; b passes; c passes (0 floor).
    assert (stats["shares"].sharing_pass, stats["shares"].sharing_scenarios) == (2, 3)
    assert stats["static"].sharing_pass == 3
    assert stats["oracle"].sharing_pass == 3


def test_no_baseline_no_sharing_check() -> None:
    stats = by_policy(suite_stats([r for r in RECORDS if r.policy != "static"]))
    assert stats["shares"].sharing_pass is None


def test_double_paging() -> None:
    shares = by_policy(suite_stats(RECORDS))["shares"]
    assert (shares.double_paging.scenarios_with_any, shares.double_paging.events) == (2, 8)
    assert shares.double_paging.scenarios == 3
    ballooned = shares.double_paging_ballooned
    assert (ballooned.scenarios_with_any, ballooned.events, ballooned.scenarios) == (1, 3, 2)


def test_a_second_bound_is_just_another_name() -> None:
    fair = [
        rec("a", "oracle-fair", {"x": 90.0, "y": 90.0}),
        rec("b", "oracle-fair", {"x": 100.0, "y": 0.0}),
    ]
    stats = by_policy(suite_stats(RECORDS + fair, bounds=("oracle", "oracle-fair")))
    bounds = [r.bound for r in stats["static"].relative]
    assert bounds == ["oracle", "oracle-fair"]
    assert stats["static"].relative[1].worst == pytest.approx(150 / 180)


def test_summary_json_is_json() -> None:
    summary = summary_json(suite_stats(RECORDS))
    again = json.loads(json.dumps(summary, allow_nan=False))
    assert again["policies"]["static"]["relative"]["oracle"]["worst_scenario"] == "b"
    assert again["policies"]["shares"]["versus"]["static"]["at_least_as_good"] == 1.0


def test_record_json_round_trip() -> None:
    for r in RECORDS:
        again = record_from_json(json.loads(json.dumps(record_to_json(r))))
        assert again == r and again.cpu_s == r.cpu_s


def test_cpu_time_is_not_part_of_equality() -> None:
    a = RECORDS[0]
    b = RunRecord(**{**a.__dict__, "cpu_s": 99.0})
    assert a == b


throughputs = st.floats(min_value=0.0, max_value=1e7, allow_nan=False)


@given(st.lists(st.tuples(throughputs, throughputs, throughputs), min_size=1, max_size=30))
def test_properties(rows: list[tuple[float, float, float]]) -> None:
    records = []
    for i, (bound, p, q) in enumerate(rows):
        records += [
            rec(f"s{i}", "oracle", {"g": bound}),
            rec(f"s{i}", "p", {"g": p}),
            rec(f"s{i}", "q", {"g": q}),
        ]
    stats = by_policy(suite_stats(records))
    p_vs_q = next(v for v in stats["p"].versus if v.peer == "q")
    q_vs_p = next(v for v in stats["q"].versus if v.peer == "p")
    assert p_vs_q.wins + p_vs_q.ties + p_vs_q.losses == len(rows)
    # Wins of one are losses of the other; ties are shared.
    assert (p_vs_q.wins, p_vs_q.ties, p_vs_q.losses) == (q_vs_p.losses, q_vs_p.ties, q_vs_p.wins)
    ps = ratios(records, "oracle").get("p", [])
    if stats["p"].relative:
        rel = stats["p"].relative[0]
        assert rel.scenarios == len(ps)
        assert rel.worst == min(ps) <= rel.p10 <= rel.median <= max(ps)
    else:  # the bound did no work anywhere
        assert all(bound < MIN_BOUND_REFS_PER_S for bound, _, _ in rows)


def test_slices_join_into_one_suite() -> None:
    online = [rec("s0", "a", {"g": 1.0}), rec("s1", "a", {"g": 2.0})]
    bound = [rec("s0", "b", {"g": 3.0}), rec("s1", "b", {"g": 4.0})]
    joined = join_slices([("online", online), ("bound", bound)], ("a", "b"))
    assert sorted((r.scenario, r.policy) for r in joined) == [
        ("s0", "a"),
        ("s0", "b"),
        ("s1", "a"),
        ("s1", "b"),
    ]


@pytest.mark.parametrize(
    ("slices", "message"),
    [
        ([("x", [rec("s0", "a", {"g": 1.0})]), ("y", [rec("s0", "a", {"g": 1.0})])], "in x too"),
        ([("x", [rec("s0", "a", {"g": 1.0}), rec("s0", "c", {"g": 1.0})])], "policy 'c'"),
        ([("x", [rec("s0", "a", {"g": 1.0}), rec("s1", "a", {"g": 1.0})]), ("y", [])], "of b"),
    ],
    ids=["repeated", "other-policy", "incomplete"],
)
def test_slices_that_do_not_make_one_suite_are_refused(
    slices: list[tuple[str, list[RunRecord]]], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        join_slices(slices, ("a", "b"))
