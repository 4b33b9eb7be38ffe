"""The oracle: its dynamic programme is optimal, its decisions legal, its phases timely,
and oracle-fair keeps every guest at 0.9x of its static throughput."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from balloonist.errors import ConfigError
from balloonist.model import (
    Decision,
    GuestSample,
    GuestSpec,
    GuestView,
    HostSample,
    HostState,
    Mechanisms,
    Snapshot,
)
from balloonist.policy import Policy
from balloonist.sim.curves import CurveBook
from balloonist.sim.oracle import FAIR_FRACTION, OraclePolicy, best_choices, throughput_refs_per_s
from balloonist.sim.scenario import Costs, Replacement, SimGuest
from balloonist.sim.valuation import HostPaging, ModeValues
from balloonist.sim.workload import Phase, Workload, WorkloadKind, WorkloadPlan
from balloonist.units import GIB, MIB, PAGE_SIZE_BYTES

#: The scenario file's default costs.
COSTS = Costs(
    reference_s=1e-6,
    guest_minor_fault_s=2e-6,
    guest_swap_in_s=100e-6,
    guest_swap_out_s=20e-6,
    host_alloc_s=2e-6,
    host_swap_in_s=110e-6,
    host_swap_out_s=20e-6,
    balloon_page_s=0.5e-6,
)
KERNEL_PAGES = 16 * MIB // PAGE_SIZE_BYTES  # the scenario file's default kernel
#: Totals within this relative distance are the same optimum reached by another path.
OPTIMUM_RTOL = 1e-9
#: One book of curves for the oracles and the checks: both see the same measurements.
BOOK = CurveBook()


def _oracle(guests: Sequence[SimGuest], **kwargs: Any) -> OraclePolicy:
    # Fresh valuations for every oracle, from the one book of curves.
    return OraclePolicy(guests, COSTS, modes=ModeValues(COSTS, BOOK), **kwargs)


def _value(
    guest: SimGuest, time_s: float, allocation_pages: npt.ArrayLike
) -> npt.NDArray[np.float64]:
    """Modelled throughput of ``guest`` at ``time_s`` holding ``allocation_pages``."""
    active = guest.plan.active_pages_at(time_s)
    resident = np.maximum(np.asarray(allocation_pages) - guest.kernel_pages, 0)
    if active == 0:
        return np.zeros(resident.shape)
    miss = BOOK.miss_ratio(guest.plan.at(time_s), active, guest.replacement, resident)
    return throughput_refs_per_s(miss, COSTS)


def _pages(mib: int) -> int:
    return mib * MIB // PAGE_SIZE_BYTES


def _guest(
    name: str,
    workload: Workload | WorkloadPlan,
    *,
    memory_bytes: int = 512 * MIB,
    min_bytes: int = 0,
    max_bytes: int | None = None,
    kernel_pages: int = KERNEL_PAGES,
    replacement: Replacement = Replacement.LRU,
) -> SimGuest:
    plan = workload if isinstance(workload, WorkloadPlan) else WorkloadPlan.single(workload)
    return SimGuest(
        spec=GuestSpec(name, memory_bytes, min_bytes=min_bytes, max_bytes=max_bytes),
        replacement=replacement,
        kernel_pages=kernel_pages,
        swap_pages=2 * memory_bytes // PAGE_SIZE_BYTES,
        plan=plan,
    )


def _snapshot(
    guests: Sequence[SimGuest],
    host_memory_bytes: int,
    time_s: float = 0.0,
    held_bytes: dict[str, int] | None = None,
    swapped_bytes: dict[str, int] | None = None,
) -> Snapshot:
    host = HostSample(time_s, host_memory_bytes, 0, 0, 0, HostState.HIGH)
    held, swapped = held_bytes or {}, swapped_bytes or {}
    views = tuple(
        GuestView(
            g.spec,
            GuestSample(g.name, held.get(g.name, 0), 0, 0, swap_used_bytes=swapped.get(g.name)),
            working_set_bytes=0,
        )
        for g in guests
    )
    return Snapshot(time_s, 1.0, host, views)


def _allocations_pages(decision: Decision) -> dict[str, int]:
    return {t.name: t.allocation_bytes // PAGE_SIZE_BYTES for t in decision.targets}


def _total_throughput(guests: Sequence[SimGuest], decision: Decision, time_s: float) -> float:
    pages = _allocations_pages(decision)
    return sum(float(_value(g, time_s, [pages[g.name]])[0]) for g in guests)


# --- the dynamic programme against brute force ----------------------------------------------

_values = st.lists(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=7).map(np.array),
    min_size=0,
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(values=_values, capacity=st.integers(0, 14))
def test_best_choices_finds_the_brute_force_optimum(
    values: list[npt.NDArray[np.float64]], capacity: int
) -> None:
    # Arbitrary values: non-concave and non-monotone, where a greedy allocator fails.
    brute = max(
        (
            sum((float(v[k]) for v, k in zip(values, ks, strict=True)), 0.0)
            for ks in itertools.product(*(range(len(v)) for v in values))
            if sum(ks) <= capacity
        ),
    )
    chosen, total = best_choices(values, capacity)
    assert sum(chosen) <= capacity
    assert all(0 <= k < len(v) for k, v in zip(chosen, values, strict=True))
    achieved = sum((float(v[k]) for v, k in zip(values, chosen, strict=True)), 0.0)
    scale = max(1.0, abs(brute))
    assert achieved == pytest.approx(total, rel=OPTIMUM_RTOL, abs=len(values) * 1e-9 * scale)
    assert achieved == pytest.approx(brute, rel=OPTIMUM_RTOL, abs=len(values) * 1e-9 * scale)


def test_best_choices_prefers_fewer_units_on_a_tie() -> None:
    flat = np.array([0.0, 5.0, 5.0, 5.0])
    assert best_choices([flat, flat], 6) == ((1, 1), 10.0)


def test_best_choices_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="capacity"):
        best_choices([np.zeros(2)], -1)
    with pytest.raises(ValueError, match="at least one option"):
        best_choices([np.zeros(0)], 3)


# The oracle at one-page granularity against every legal allocation.

_tiny_workloads = st.one_of(
    st.just(Workload(WorkloadKind.IDLE)),
    st.builds(
        Workload,
        kind=st.sampled_from([WorkloadKind.UNIFORM, WorkloadKind.SCAN, WorkloadKind.ZIPF]),
        working_set_pages=st.integers(1, 30),
        skew=st.floats(0.3, 2.0),
    ),
)


@st.composite
def _tiny_guest(draw: st.DrawFn, name: str) -> SimGuest:
    memory = draw(st.integers(8, 40))
    kernel = draw(st.integers(1, memory // 2 - 1))
    limit = draw(st.integers(1, memory))
    minimum = draw(st.integers(0, limit))
    return _guest(
        name,
        draw(_tiny_workloads),
        memory_bytes=memory * PAGE_SIZE_BYTES,
        min_bytes=minimum * PAGE_SIZE_BYTES,
        max_bytes=limit * PAGE_SIZE_BYTES,
        kernel_pages=kernel,
        replacement=draw(st.sampled_from(list(Replacement))),
    )


@settings(max_examples=80, deadline=None)
@given(
    guests=st.tuples(_tiny_guest("a"), _tiny_guest("b"), _tiny_guest("c")),
    budget_pages=st.integers(0, 120),
)
def test_oracle_at_page_granularity_matches_every_legal_allocation(
    guests: tuple[SimGuest, ...], budget_pages: int
) -> None:
    # A guest never holds less than its reservation, nor less than its kernel.
    floors = [
        min(max(g.spec.min_bytes // PAGE_SIZE_BYTES, g.kernel_pages), g.spec.limit_bytes // 4096)
        for g in guests
    ]
    assume(sum(floors) <= budget_pages)
    oracle = _oracle(guests, grid_steps=max(budget_pages, 1))  # one page per step
    decision = oracle.decide(_snapshot(guests, budget_pages * PAGE_SIZE_BYTES))

    per_guest = []
    for g, floor in zip(guests, floors, strict=True):
        allocations = np.arange(floor, g.spec.limit_bytes // PAGE_SIZE_BYTES + 1)
        per_guest.append((allocations, _value(g, 0.0, allocations)))
    (a0, v0), (a1, v1), (a2, v2) = per_guest
    totals = v0[:, None, None] + v1[None, :, None] + v2[None, None, :]
    used = a0[:, None, None] + a1[None, :, None] + a2[None, None, :]
    brute = float(np.max(np.where(used <= budget_pages, totals, -np.inf)))

    assert sum(_allocations_pages(decision).values()) <= budget_pages
    assert _total_throughput(guests, decision, 0.0) == pytest.approx(brute, rel=OPTIMUM_RTOL)


# --- every decision is legal ------------------------------------------------------------------

_workloads = st.one_of(
    st.just(Workload(WorkloadKind.IDLE)),
    st.builds(
        Workload,
        kind=st.sampled_from([WorkloadKind.UNIFORM, WorkloadKind.SCAN, WorkloadKind.ZIPF]),
        working_set_pages=st.integers(1, _pages(40)),
        skew=st.floats(0.3, 3.0),
    ),
)


@st.composite
def _guests(draw: st.DrawFn) -> list[SimGuest]:
    guests = []
    for i in range(draw(st.integers(1, 6))):
        memory = draw(st.integers(_pages(16), _pages(96)))
        limit = draw(st.integers(1, memory))
        minimum = draw(st.integers(0, limit))
        guests.append(
            _guest(
                f"g{i}",
                draw(_workloads),
                memory_bytes=memory * PAGE_SIZE_BYTES,
                min_bytes=minimum * PAGE_SIZE_BYTES,
                max_bytes=limit * PAGE_SIZE_BYTES,
                kernel_pages=draw(st.integers(0, memory // 2 - 1)),
            )
        )
    return guests


@settings(max_examples=60, deadline=None)
@given(guests=_guests(), host_memory_bytes=st.integers(32 * MIB, 400 * MIB), fair=st.booleans())
def test_decisions_are_whole_pages_within_min_limit_and_host_memory(
    guests: list[SimGuest], host_memory_bytes: int, fair: bool
) -> None:
    assume(sum(g.spec.min_bytes for g in guests) <= host_memory_bytes)
    decision = _oracle(guests, fair=fair).decide(_snapshot(guests, host_memory_bytes))

    assert decision.mechanisms == Mechanisms(balloon=True, host_paging=False)
    targets = decision.by_name()
    assert set(targets) == {g.name for g in guests}
    for g in guests:
        t = targets[g.name]
        assert t.allocation_bytes % PAGE_SIZE_BYTES == 0
        assert g.spec.min_bytes <= t.allocation_bytes <= g.spec.limit_bytes
        assert t.balloon_bytes == g.spec.memory_bytes - t.allocation_bytes
    total = sum(t.allocation_bytes for t in decision.targets)
    assert total <= host_memory_bytes
    # No free target: the whole host is handed out unless every guest is at its limit.
    limits = sum(g.spec.limit_bytes // PAGE_SIZE_BYTES for g in guests) * PAGE_SIZE_BYTES
    assert total >= min(limits, host_memory_bytes // PAGE_SIZE_BYTES * PAGE_SIZE_BYTES)


# --- known cases --------------------------------------------------------------------------


def test_two_uniform_guests_that_fit_both_get_their_whole_working_set() -> None:
    guests = [
        _guest("small", Workload(WorkloadKind.UNIFORM, _pages(100))),
        _guest("large", Workload(WorkloadKind.UNIFORM, _pages(300))),
    ]
    decision = _oracle(guests).decide(_snapshot(guests, (400 + 2 * 16) * MIB))
    assert _allocations_pages(decision) == {
        "small": KERNEL_PAGES + _pages(100),
        "large": KERNEL_PAGES + _pages(300),
    }
    assert decision.by_name()["small"].balloon_bytes == (512 - 16 - 100) * MIB


def test_memory_no_one_gains_from_is_handed_out_evenly_up_to_limits() -> None:
    guests = [
        _guest("a", Workload(WorkloadKind.UNIFORM, _pages(100))),
        _guest("b", Workload(WorkloadKind.IDLE), max_bytes=64 * MIB),
        _guest("c", Workload(WorkloadKind.IDLE)),
    ]
    decision = _oracle(guests).decide(_snapshot(guests, GIB))
    # a needs 116 MiB; the other 876 MiB go out in equal extras: b fills to its 64 MiB
    # limit, a to its 512 MiB, c takes what is left.
    assert _allocations_pages(decision) == {"a": _pages(512), "b": _pages(64), "c": _pages(448)}


def test_memory_no_one_gains_from_goes_first_to_whoever_holds_it() -> None:
    guests = [
        _guest("a", Workload(WorkloadKind.UNIFORM, _pages(100))),
        _guest("b", Workload(WorkloadKind.IDLE)),
    ]
    host = (100 + 2 * 16 + 200) * MIB
    held = {"a": 16 * MIB, "b": 216 * MIB}  # b filled memory earlier and went idle
    decision = _oracle(guests).decide(_snapshot(guests, host, held_bytes=held))
    assert _allocations_pages(decision) == {"a": _pages(116), "b": _pages(216)}


def test_two_scans_that_do_not_both_fit_are_not_split() -> None:
    # Half a scan's working set is worth nothing, so a proportional split (or a greedy
    # allocator following marginal gains) would leave both thrashing.
    guests = [
        _guest("a", Workload(WorkloadKind.SCAN, _pages(300))),
        _guest("b", Workload(WorkloadKind.SCAN, _pages(300))),
    ]
    decision = _oracle(guests).decide(_snapshot(guests, (450 + 2 * 16) * MIB))
    allocations = sorted(_allocations_pages(decision).values())
    assert allocations[1] >= KERNEL_PAGES + _pages(300)
    assert sum(allocations) == _pages(450 + 2 * 16)


def test_a_working_set_edge_off_the_grid_is_reached_exactly() -> None:
    # 3 MiB steps on a 1.5 GiB host: the scan's edge (kernel + 301 MiB) is off the grid,
    # and missing it by one page would leave it all misses.
    scan = _guest("scan", Workload(WorkloadKind.SCAN, _pages(301)))
    zipf = _guest("zipf", Workload(WorkloadKind.ZIPF, _pages(200), skew=0.8), memory_bytes=GIB)
    host_pages = KERNEL_PAGES * 2 + _pages(301) + _pages(50) + 3
    decision = _oracle([scan, zipf]).decide(_snapshot([scan, zipf], host_pages * PAGE_SIZE_BYTES))
    assert _allocations_pages(decision)["scan"] == KERNEL_PAGES + _pages(301)


def test_limit_caps_a_guest_that_wants_more() -> None:
    guests = [_guest("a", Workload(WorkloadKind.UNIFORM, _pages(400)), max_bytes=200 * MIB)]
    decision = _oracle(guests).decide(_snapshot(guests, 2 * GIB))
    assert decision.by_name()["a"].allocation_bytes == 200 * MIB


def test_a_scan_above_its_limit_is_left_to_the_hosts_paging_where_there_is_host_swap() -> None:
    # Ballooned to its limit, LRU misses every page of the scan; the host's random
    # victims keep part of it. Only where the host has swap can it page at all.
    scan = _guest("s", Workload(WorkloadKind.SCAN, _pages(300)), max_bytes=256 * MIB)
    fits = _guest("f", Workload(WorkloadKind.UNIFORM, _pages(100)))
    guests = [scan, fits]
    balloons_only = _oracle(guests)
    ballooned = balloons_only.decide(_snapshot(guests, 2 * GIB))
    assert not ballooned.mechanisms.host_paging
    assert ballooned.by_name()["s"].balloon_bytes == (512 - 256) * MIB
    oracle = _oracle(guests, host_swap_pages=_pages(1024))
    decision = oracle.decide(_snapshot(guests, 2 * GIB))
    assert decision.mechanisms.host_paging
    s, f = decision.by_name()["s"], decision.by_name()["f"]
    assert (s.allocation_bytes, s.balloon_bytes) == (256 * MIB, 0)
    assert f.balloon_bytes == 512 * MIB - f.allocation_bytes  # it fits: ballooned as ever


@pytest.mark.parametrize("scope", [HostPaging.CONFINED, HostPaging.ANYWHERE])
def test_a_guest_that_fits_only_by_starving_another_is_host_paged_only_where_anywhere(
    scope: HostPaging,
) -> None:
    # "a" could hold its 300 MiB set ballooned with "b" at its floor, so it is not
    # confined. Host-paged at kernel + 300 MiB it holds the whole set (the host's
    # victims take the kernel's pages); ballooned there it misses 1 in 19 references.
    a = _guest("a", Workload(WorkloadKind.UNIFORM, _pages(300)))
    b = _guest("b", Workload(WorkloadKind.UNIFORM, _pages(100)))
    host_bytes = (2 * 16 + 300 + 100 - 20) * MIB
    oracle = _oracle([a, b], host_swap_pages=_pages(1024), host_paging=scope)
    decision = oracle.decide(_snapshot([a, b], host_bytes))
    anywhere = scope is HostPaging.ANYWHERE
    assert decision.mechanisms.host_paging == anywhere
    assert (decision.by_name()["a"].balloon_bytes == 0) == anywhere


@pytest.mark.parametrize(("others_mib", "follows"), [(80, False), (250, True)])
def test_a_wider_scope_follows_the_narrower_where_it_host_pages_no_other_guest(
    others_mib: int, follows: bool
) -> None:
    # "b" grows from 50 to 200 MiB in 5 s. The narrower schedule here balloons only and
    # looks no further than the period, so its plan differs from the wider one's own.
    # Where the host is tight the wider one host-pages "a" (as in the test above), which
    # the narrower may not; where it is not, it host-pages no guest and follows.
    a = _guest("a", Workload(WorkloadKind.UNIFORM, _pages(300)))
    grows = (
        Phase(0.0, Workload(WorkloadKind.UNIFORM, _pages(50))),
        Phase(5.0, Workload(WorkloadKind.UNIFORM, _pages(200))),
    )
    b = _guest("b", WorkloadPlan(grows))
    snapshot = _snapshot([a, b], (2 * 16 + 300 + others_mib) * MIB)
    swap = _pages(1024)

    def narrower() -> OraclePolicy:
        return _oracle([a, b], host_swap_pages=swap, host_paging=HostPaging.NEVER, lookahead_s=0.0)

    alone = _oracle([a, b], host_swap_pages=swap, host_paging=HostPaging.ANYWHERE)
    wider = _oracle(
        [a, b], host_swap_pages=swap, host_paging=HostPaging.ANYWHERE, narrower=narrower()
    )
    own, followed = alone.decide(snapshot), narrower().decide(snapshot)
    assert own != followed
    assert own.mechanisms.host_paging != follows
    assert wider.decide(snapshot) == (followed if follows else own)


def test_a_host_without_swap_pages_no_guest_whatever_the_scope() -> None:
    a = _guest("a", Workload(WorkloadKind.UNIFORM, _pages(300)), max_bytes=256 * MIB)
    oracle = _oracle([a], host_paging=HostPaging.ANYWHERE)
    assert not oracle.decide(_snapshot([a], GIB)).mechanisms.host_paging


def test_only_reservations_are_floors_when_the_kernels_do_not_fit() -> None:
    guests = [
        _guest("a", Workload(WorkloadKind.IDLE), memory_bytes=64 * MIB, min_bytes=20 * MIB),
        _guest("b", Workload(WorkloadKind.UNIFORM, _pages(8)), memory_bytes=64 * MIB),
    ]
    decision = _oracle(guests).decide(_snapshot(guests, 30 * MIB))  # two 16 MiB kernels
    targets = decision.by_name()
    assert targets["a"].allocation_bytes >= 20 * MIB
    assert targets["a"].allocation_bytes + targets["b"].allocation_bytes == 30 * MIB


def test_reservations_above_host_memory_are_refused() -> None:
    guests = [
        _guest("a", Workload(WorkloadKind.IDLE), min_bytes=20 * MIB),
        _guest("b", Workload(WorkloadKind.IDLE), min_bytes=20 * MIB),
    ]
    with pytest.raises(ConfigError, match="reservations"):
        _oracle(guests).decide(_snapshot(guests, 32 * MIB))


# --- phases, ramps and slices --------------------------------------------------------------


def _phased_pair() -> list[SimGuest]:
    # "a" is busy with 200 MiB until 60 s, then idle; "b" wants 300 MiB throughout.
    # 400 MiB fits a whole and most of b; once a is idle, b gets all it wants.
    a_plan = WorkloadPlan(
        (
            Phase(0.0, Workload(WorkloadKind.UNIFORM, _pages(200))),
            Phase(60.0, Workload(WorkloadKind.IDLE)),
        )
    )
    return [
        _guest("a", a_plan),
        _guest("b", Workload(WorkloadKind.UNIFORM, _pages(300))),
    ]


def test_phase_change_switches_the_decision_at_the_phase_time() -> None:
    guests = _phased_pair()
    oracle = _oracle(guests)
    host = (400 + 2 * 16) * MIB
    # Each holds what it was given: a's set is worth keeping until it goes idle.
    held = {"a": 216 * MIB, "b": 216 * MIB}
    before = _allocations_pages(oracle.decide(_snapshot(guests, host, 59.0, held)))
    at = _allocations_pages(oracle.decide(_snapshot(guests, host, 60.0, held)))
    assert before == {"a": KERNEL_PAGES + _pages(200), "b": KERNEL_PAGES + _pages(200)}
    assert at["b"] >= KERNEL_PAGES + _pages(300)  # the 100 MiB left go to both
    assert at["a"] + at["b"] == _pages(432)


def test_a_period_is_valued_slice_by_slice() -> None:
    # The phase changes half-way through the period: with two slices, the second one
    # already runs without a, and b's value counts for both halves. (The period alone:
    # a look-ahead would see a idle too.)
    guests = _phased_pair()
    host = (400 + 2 * 16) * MIB
    whole_period = _oracle(guests, lookahead_s=0.0)
    whole = _allocations_pages(whole_period.decide(_snapshot(guests, host, time_s=59.5)))
    halves = _oracle(guests, period_s=1.0, slices_per_period=2, lookahead_s=0.0)
    split = _allocations_pages(halves.decide(_snapshot(guests, host, time_s=59.5)))
    assert whole["b"] == KERNEL_PAGES + _pages(200)
    assert split["b"] > whole["b"]


def test_a_ramp_is_planned_at_its_active_size() -> None:
    ramp = _guest("ramp", Workload(WorkloadKind.UNIFORM, _pages(400), ramp_s=40.0))
    other = _guest("other", Workload(WorkloadKind.UNIFORM, _pages(400)))
    host = (400 + 2 * 16) * MIB
    oracle = _oracle([ramp, other], lookahead_s=0.0)
    decision = oracle.decide(_snapshot([ramp, other], host, time_s=10.0))
    # 10 s into the ramp a quarter of the set is active: it gets that, other the rest.
    assert _allocations_pages(decision) == {
        "ramp": KERNEL_PAGES + _pages(100),
        "other": KERNEL_PAGES + _pages(300),
    }


def test_decisions_repeat_while_the_phases_stay() -> None:
    guests = _phased_pair()
    oracle = _oracle(guests)
    host = (400 + 2 * 16) * MIB
    held = {"a": 216 * MIB, "b": 216 * MIB}
    first = oracle.decide(_snapshot(guests, host, 1.0, held))
    assert oracle.decide(_snapshot(guests, host, 40.0, held)) == first
    assert oracle.decide(_snapshot(guests, host, 61.0, held)) != first


# --- the look-ahead ---------------------------------------------------------------------------


def _raid_pair() -> list[SimGuest]:
    # "a" keeps a 200 MiB zipf set; for the one second from 60 s, "b" wants 300 MiB at
    # once, which a zipf set half its size would pay for in a period's steady state.
    b_plan = WorkloadPlan(
        (
            Phase(0.0, Workload(WorkloadKind.UNIFORM, _pages(100))),
            Phase(60.0, Workload(WorkloadKind.UNIFORM, _pages(300))),
            Phase(61.0, Workload(WorkloadKind.UNIFORM, _pages(100))),
        )
    )
    return [
        _guest("a", Workload(WorkloadKind.ZIPF, _pages(200), skew=1.2)),
        _guest("b", b_plan),
    ]


@pytest.mark.parametrize(("lookahead_s", "raided"), [(0.0, True), (10.0, False)])
def test_a_held_cache_is_not_raided_for_a_gain_that_lasts_one_period(
    lookahead_s: float, raided: bool
) -> None:
    guests = _raid_pair()
    host = (400 + 2 * 16) * MIB
    held = {"a": 216 * MIB, "b": 216 * MIB}
    oracle = _oracle(guests, lookahead_s=lookahead_s)
    pages = _allocations_pages(oracle.decide(_snapshot(guests, host, 60.0, held)))
    assert (pages["a"] < KERNEL_PAGES + _pages(200)) == raided


def test_a_gain_that_lasts_is_taken_at_once() -> None:
    # The same jump, for good from 60 s: the look-ahead agrees with the period.
    b_plan = WorkloadPlan(
        (
            Phase(0.0, Workload(WorkloadKind.UNIFORM, _pages(100))),
            Phase(60.0, Workload(WorkloadKind.UNIFORM, _pages(300))),
        )
    )
    guests = [_raid_pair()[0], _guest("b", b_plan)]
    host = (400 + 2 * 16) * MIB
    held = {"a": 216 * MIB, "b": 216 * MIB}
    snapshot = _snapshot(guests, host, 60.0, held)
    ahead = _oracle(guests).decide(snapshot)
    assert ahead == _oracle(guests, lookahead_s=0.0).decide(snapshot)
    assert _allocations_pages(ahead)["b"] >= KERNEL_PAGES + _pages(300)


@pytest.mark.parametrize(("swapped_mib", "moved"), [(100, False), (0, True)])
def test_a_set_held_is_not_traded_for_one_that_must_be_read_back(
    swapped_mib: int, moved: bool
) -> None:
    # Two 100 MiB scans, room for one: "a" holds its set, "b" holds its kernel and,
    # swapped out, its set. Held alike they would be worth the same, and the tie goes
    # to the first guest, "b"; reading 100 MiB back at 100 us a page costs it 2.6 s of
    # the 11 s valued, so "a" keeps its set. A set "b" never touched costs only first
    # touches, and the tie stands.
    scan = Workload(WorkloadKind.SCAN, _pages(100))
    guests = [_guest("b", scan), _guest("a", scan)]
    host = (100 + 2 * 16) * MIB
    held = {"a": 116 * MIB, "b": 16 * MIB}
    swapped = {"a": 0, "b": swapped_mib * MIB}
    pages = _allocations_pages(_oracle(guests).decide(_snapshot(guests, host, 0.0, held, swapped)))
    assert (pages["b"] >= KERNEL_PAGES + _pages(100)) == moved
    assert (pages["a"] >= KERNEL_PAGES + _pages(100)) != moved


def test_the_look_ahead_stops_at_the_run_s_end() -> None:
    # In a run that ends at 61 s, b's one-second jump is its last: nothing lies ahead.
    guests = _raid_pair()
    host = (400 + 2 * 16) * MIB
    held = {"a": 216 * MIB, "b": 216 * MIB}
    snapshot = _snapshot(guests, host, 60.0, held)
    ending = _oracle(guests, until_s=61.0).decide(snapshot)
    assert ending == _oracle(guests, lookahead_s=0.0).decide(snapshot)
    assert ending != _oracle(guests).decide(snapshot)


def test_guest_missing_from_the_snapshot_is_planned_for_but_gets_no_target() -> None:
    guests = [
        _guest("a", Workload(WorkloadKind.UNIFORM, _pages(300))),
        _guest("b", Workload(WorkloadKind.UNIFORM, _pages(300))),
    ]
    oracle = _oracle(guests)
    host = (400 + 2 * 16) * MIB
    everyone = oracle.decide(_snapshot(guests, host)).by_name()
    only_a = oracle.decide(_snapshot(guests[:1], host)).by_name()
    # "b" still holds memory, so "a" is not handed b's share.
    assert only_a == {"a": everyone["a"]}


# --- oracle-fair ------------------------------------------------------------------------------


def test_fair_keeps_every_guest_at_the_fraction_of_its_static_throughput() -> None:
    # Shares 1:4 and a tight host: the plain oracle starves the small-share guest,
    # whose working set is worth less per page; the fair one may not.
    guests = [
        SimGuest(
            spec=GuestSpec("small", 512 * MIB, shares=1000),
            replacement=Replacement.LRU,
            kernel_pages=KERNEL_PAGES,
            swap_pages=_pages(1024),
            plan=WorkloadPlan.single(Workload(WorkloadKind.UNIFORM, _pages(400))),
        ),
        SimGuest(
            spec=GuestSpec("big", 512 * MIB, shares=4000),
            replacement=Replacement.LRU,
            kernel_pages=KERNEL_PAGES,
            swap_pages=_pages(1024),
            plan=WorkloadPlan.single(Workload(WorkloadKind.ZIPF, _pages(400), skew=1.2)),
        ),
    ]
    host_pages = _pages(400)
    static = {"small": _pages(80), "big": _pages(320)}  # 1:4 of the host
    snapshot = _snapshot(guests, host_pages * PAGE_SIZE_BYTES)
    plain = _allocations_pages(_oracle(guests).decide(snapshot))
    fair = _allocations_pages(_oracle(guests, fair=True).decide(snapshot))
    for g in guests:
        floor = FAIR_FRACTION * float(_value(g, 0.0, [static[g.name]])[0])
        assert float(_value(g, 0.0, [fair[g.name]])[0]) >= floor * (1 - 1e-9)
    small = guests[0]
    assert float(_value(small, 0.0, [plain["small"]])[0]) < FAIR_FRACTION * float(
        _value(small, 0.0, [static["small"]])[0]
    )
    assert _total_throughput(guests, _oracle(guests).decide(snapshot), 0.0) >= _total_throughput(
        guests, _oracle(guests, fair=True).decide(snapshot), 0.0
    )


# --- construction and interface ---------------------------------------------------------------


@pytest.mark.parametrize(("fair", "name"), [(False, "oracle"), (True, "oracle-fair")])
def test_is_a_policy_named_after_its_rule(fair: bool, name: str) -> None:
    policy: Policy = _oracle([], fair=fair)
    assert policy.name == name
    assert policy.decide(_snapshot([], GIB)).targets == ()


def test_unknown_guest_in_the_snapshot_is_refused() -> None:
    known = _guest("a", Workload(WorkloadKind.IDLE))
    stranger = _guest("z", Workload(WorkloadKind.IDLE))
    with pytest.raises(ConfigError, match="'z'"):
        _oracle([known]).decide(_snapshot([known, stranger], GIB))


@pytest.mark.parametrize("kwargs", [{"grid_steps": 0}, {"slices_per_period": 0}, {"period_s": 0.0}])
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="positive"):
        _oracle([], **kwargs)


def test_a_negative_look_ahead_is_refused() -> None:
    with pytest.raises(ConfigError, match="look-ahead"):
        _oracle([], lookahead_s=-1.0)


def test_duplicate_guest_names_are_refused() -> None:
    twin = _guest("a", Workload(WorkloadKind.IDLE))
    with pytest.raises(ConfigError, match="duplicate"):
        _oracle([twin, twin])


@pytest.mark.parametrize(("wakes_s", "lent"), [(30.0, False), (300.0, True)])
def test_an_idle_guest_keeps_the_cache_it_reads_again_unless_it_wakes_late(
    wakes_s: float, lent: bool
) -> None:
    # "a" uses a 100 MiB set, idles from 10 s and uses it again from ``wakes_s``, past
    # the 10-s look-ahead; "b" would gain 31 k refs/s from a's 100 MiB. Lent, those
    # pages cost "a" 2.6 s of its million refs a second when it wakes: 128 k/s spread
    # over 20 s, 9 k/s over 290 s.
    uniform = Workload(WorkloadKind.UNIFORM, _pages(100))
    a_plan = WorkloadPlan(
        (Phase(0.0, uniform), Phase(10.0, Workload(WorkloadKind.IDLE)), Phase(wakes_s, uniform))
    )
    guests = [_guest("a", a_plan), _guest("b", Workload(WorkloadKind.UNIFORM, _pages(300)))]
    host = (100 + 150 + 2 * 16) * MIB
    held = {"a": 116 * MIB, "b": 166 * MIB}
    oracle = _oracle(guests, until_s=400.0)
    pages = _allocations_pages(oracle.decide(_snapshot(guests, host, 10.0, held)))
    assert (pages["a"] < KERNEL_PAGES + _pages(100)) == lent
    # Past its last wake, nothing of its cache is read again: it is lent.
    last = _oracle(guests, until_s=wakes_s).decide(_snapshot(guests, host, 10.0, held))
    assert _allocations_pages(last)["a"] == KERNEL_PAGES
