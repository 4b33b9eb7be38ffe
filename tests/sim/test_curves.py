"""Measured miss-ratio curves: exact where the answer is known, and what the engine does."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from balloonist.model import Decision, GuestTarget, Mechanisms, Snapshot
from balloonist.scheduler import Scheduler
from balloonist.sim import cachesim
from balloonist.sim import engine as e
from balloonist.sim.curves import CurveBook, measure_zipf
from balloonist.sim.guest_memory import GuestMemory, zipf_alias
from balloonist.sim.instant import MoveModel
from balloonist.sim.machine import SimMachine
from balloonist.sim.mrc import zipf_miss_ratio
from balloonist.sim.oracle import throughput_refs_per_s
from balloonist.sim.scenario import Replacement, scenario_from_dict
from balloonist.sim.workload import Phase, Workload, WorkloadKind, WorkloadPlan
from balloonist.units import MIB, PAGE_SIZE_BYTES

NO_ALIAS = (np.zeros((1, 2)),)
REFS = 1 << 18


def _lru_miss(kind: WorkloadKind, ws: int, sizes: list[int]) -> list[float]:
    hist = cachesim.lru_distance_histogram(REFS // 4, REFS, int(kind), ws, ws, *NO_ALIAS, 7)
    hits = np.concatenate(([0], np.cumsum(hist)))
    return [1.0 - hits[m] / REFS for m in sizes]


def _ring_miss(policy: Replacement, kind: WorkloadKind, ws: int, size: int) -> float:
    args = (int(kind), ws, ws, *NO_ALIAS, 7)
    return cachesim.ring_misses(int(policy), size, REFS // 4, REFS, *args) / REFS  # type: ignore[no-any-return]


def test_measured_uniform_is_the_resident_fraction_under_every_replacement() -> None:
    ws = 2000
    sizes = [1, 500, 1000, 1500, 1999]
    exact = [1.0 - m / ws for m in sizes]
    assert _lru_miss(WorkloadKind.UNIFORM, ws, sizes) == pytest.approx(exact, abs=0.005)
    for policy in (Replacement.CLOCK, Replacement.FIFO):
        measured = [_ring_miss(policy, WorkloadKind.UNIFORM, ws, m) for m in sizes]
        assert measured == pytest.approx(exact, abs=0.005)


@pytest.mark.parametrize("policy", [int(Replacement.CLOCK), int(Replacement.FIFO), cachesim.RANDOM])
def test_a_grid_of_sizes_on_one_drawn_stream_counts_what_each_size_alone_does(policy: int) -> None:
    workload = Workload(WorkloadKind.ZIPF, 3000, skew=0.9)
    table = zipf_alias(workload)
    args = (
        int(workload.kind),
        3000,
        2500,
        table,
        7,
    )
    sizes = np.array([1, 40, 700, 2499, 2500], dtype=np.int64)
    grid = cachesim.ring_misses_grid(policy, sizes, REFS // 4, REFS, *args)
    alone = [cachesim.ring_misses(policy, int(m), REFS // 4, REFS, *args) for m in sizes]
    assert list(grid) == alone
    assert grid[0] > grid[2] > grid[-1] == 0  # and the sizes did differ


def test_measured_scan_is_a_cliff_at_the_working_set_under_every_replacement() -> None:
    ws = 1000
    assert _lru_miss(WorkloadKind.SCAN, ws, [1, 500, 999, 1000]) == [1.0, 1.0, 1.0, 0.0]
    for policy in (Replacement.CLOCK, Replacement.FIFO):
        assert _ring_miss(policy, WorkloadKind.SCAN, ws, 999) == 1.0
        assert _ring_miss(policy, WorkloadKind.SCAN, ws, 1000) == 0.0


def test_the_hosts_random_victims_keep_part_of_a_scan_as_the_fixed_point_says() -> None:
    # Random eviction on a cyclic scan of N pages in m frames: a page survives the
    # N * miss evictions between its references with probability exp(-N * miss / m),
    # so the miss ratio solves 1 - miss = exp(-miss * N / m). LRU keeps nothing.
    ws = 4000
    book = CurveBook()
    scan = Workload(WorkloadKind.SCAN, ws)
    for fraction in (0.5, 0.75, 0.95):
        low, high = 0.0, 1.0
        for _ in range(60):  # bisect the fixed point
            mid = (low + high) / 2
            if 1.0 - mid > np.exp(-mid / fraction):
                low = mid
            else:
                high = mid
        measured = float(book.host_miss_ratio(scan, ws, np.array([fraction * ws]))[0])
        assert measured == pytest.approx(low, abs=0.02)
        assert float(book.miss_ratio(scan, ws, Replacement.LRU, np.array([fraction * ws]))[0]) == 1
    uniform = Workload(WorkloadKind.UNIFORM, ws)
    assert book.host_miss_ratio(uniform, ws, np.array([1000, 3000])) == pytest.approx([0.75, 0.25])


def test_measured_zipf_lru_agrees_with_che_where_che_is_good() -> None:
    # Che's approximation is known to be within a few per cent for LRU under IRM.
    sizes, miss = measure_zipf(Workload(WorkloadKind.ZIPF, 4000, skew=0.9), 4000, Replacement.LRU)
    grid = np.array([100, 1000, 2000, 3000])
    assert np.interp(grid, sizes, miss) == pytest.approx(zipf_miss_ratio(4000, 0.9, grid), rel=0.05)


def test_curves_are_falling_and_exact_at_the_ends() -> None:
    book = CurveBook()
    for replacement in Replacement:
        w = Workload(WorkloadKind.ZIPF, 3000, skew=1.1)
        for active in (3000, 1234):  # whole, and folded while ramping
            miss = book.miss_ratio(w, active, replacement, np.arange(0, 3200, 50))
            assert miss[0] == 1.0
            assert np.all(np.diff(miss) <= 1e-12)
            assert miss[-1] == 0.0


def test_idle_and_inactive_never_miss() -> None:
    book = CurveBook()
    assert not book.miss_ratio(Workload(WorkloadKind.IDLE), 0, Replacement.LRU, [0, 5]).any()
    assert not book.miss_ratio(Workload(WorkloadKind.UNIFORM, 9), 0, Replacement.LRU, [0]).any()


def test_active_pages_at_follows_the_engines_ramps() -> None:
    plan = WorkloadPlan(
        (
            Phase(0.0, Workload(WorkloadKind.ZIPF, 1000, ramp_s=10.0)),
            Phase(20.0, Workload(WorkloadKind.ZIPF, 3000, ramp_s=7.0)),
            Phase(40.0, Workload(WorkloadKind.UNIFORM, 500, offset_pages=4000, ramp_s=3.0)),
            Phase(50.0, Workload(WorkloadKind.IDLE)),
            Phase(60.0, Workload(WorkloadKind.SCAN, 800)),
        )
    )
    sc = scenario_from_dict(
        {
            "host": {"memory": "64MiB"},
            "guests": [
                {"name": "g", "memory": "32MiB", "kernel": "4MiB", "workload": {"kind": "idle"}}
            ],
        },
        where="test",
        default_name="test",
    )
    guest = sc.guests[0].__class__(**{**sc.guests[0].__dict__, "plan": plan})
    mem = GuestMemory(guest, 0, 1, np.zeros(e.N_COSTS))
    for t in np.arange(0.0, 70.0, 0.25):
        mem.set_phase(float(t))
        engine_pages = 0 if mem.workload.kind is WorkloadKind.IDLE else mem.active_pages(float(t))
        assert plan.active_pages_at(float(t)) == engine_pages, t


class _Fixed:
    """Every guest at ``allocation_mib``, whatever happens."""

    def __init__(self, allocation_mib: int) -> None:
        self.allocation_mib = allocation_mib

    @property
    def name(self) -> str:
        return "fixed"

    def decide(self, snapshot: Snapshot) -> Decision:
        a = self.allocation_mib * MIB
        targets = tuple(GuestTarget(v.name, a, v.spec.memory_bytes - a) for v in snapshot.guests)
        return Decision(targets, Mechanisms(balloon=True, host_paging=False))


def _lone_guest(workload: dict[str, Any], replacement: str, costs: dict[str, float]) -> Any:
    return scenario_from_dict(
        {
            "host": {"memory": "256MiB", "swap": "256MiB"},
            "sim": {"duration_s": 40, "seed": 9},
            "costs": costs,
            "guests": [
                {
                    "name": "g",
                    "memory": "128MiB",
                    "kernel": "4MiB",
                    "replacement": replacement,
                    "workload": workload,
                }
            ],
        },
        where="test",
        default_name="test",
    )


@pytest.mark.parametrize("replacement", list(Replacement))
@pytest.mark.parametrize(
    "workload",
    [
        {"kind": "zipf", "working_set": "40MiB", "skew": 0.9},
        # ranks beyond the active size fold onto it: a ramp from 40MiB so slow that the
        # active size stays put
        {
            "kind": "phases",
            "phases": [
                {"at_s": 0.0, "workload": {"kind": "zipf", "working_set": "40MiB"}},
                {
                    "at_s": 1.0,
                    "workload": {
                        "kind": "zipf",
                        "working_set": "80MiB",
                        "skew": 0.7,
                        "ramp_s": 86400,
                    },
                },
            ],
        },
    ],
)
def test_curve_and_throughput_match_the_engine_at_a_fixed_allocation(
    replacement: Replacement, workload: dict[str, Any]
) -> None:
    costs = {"reference_s": 1e-5}
    sc = _lone_guest(workload, replacement.name.lower(), costs)
    allocation_mib = 4 + 16  # kernel plus half (or a quarter) of the working set
    machine = SimMachine(sc, moves=MoveModel.INSTANT)
    scheduler = Scheduler(machine, _Fixed(allocation_mib), period_s=sc.period_s)
    warm_periods, periods = 15, 25
    for k in range(warm_periods + periods):
        if k == warm_periods:
            before = machine.guests[0].st.copy()
        scheduler.step()
        machine.advance(sc.period_s)
    st = machine.guests[0].st - before
    refs = int(st[e.S_REFS])
    measured = int(st[e.S_MAJOR] + st[e.S_MINOR]) / refs
    guest = sc.guests[0]
    middle_s = (warm_periods + periods / 2) * sc.period_s
    active = guest.plan.active_pages_at(middle_s)
    resident = allocation_mib * MIB // PAGE_SIZE_BYTES - guest.kernel_pages
    model = float(
        CurveBook().miss_ratio(guest.plan.at(middle_s), active, replacement, [resident])[0]
    )
    assert measured == pytest.approx(model, rel=0.03)
    assert refs / (periods * sc.period_s) == pytest.approx(
        float(throughput_refs_per_s(model, sc.costs)), rel=0.03
    )
