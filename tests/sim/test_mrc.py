"""Miss-ratio curves: exact where exact, and checked against brute-force caches elsewhere."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balloonist.sim.mrc import (
    miss_ratio_curve,
    scan_miss_ratio,
    uniform_miss_ratio,
    zipf_miss_ratio,
)
from balloonist.sim.scenario import Replacement
from balloonist.sim.workload import Workload, WorkloadKind

#: Working set of the simulated traces: small enough for a pure-Python cache.
TRACE_WS_PAGES = 200
#: References per trace; the sampling error of a miss ratio is then ~0.1 %.
TRACE_REFS = 200_000
#: References dropped before counting, so cold misses do not count (every page of the
#: working set is referenced ~100 times by then at skew 1).
TRACE_WARMUP_REFS = 20_000
#: Simulated vs analytic miss ratio. Che's approximation is known to be good to ~1 %
#: on small caches; with the sampling error this leaves room without hiding a bug
#: (a wrong curve is off by 5-30 %).
SIM_TOLERANCE = 0.02
#: Grouped, interpolated Che solution vs a per-point bisection on every rank.
CHE_SOLVER_TOLERANCE = 1e-3

_SIZES = np.arange(0, TRACE_WS_PAGES + 11, 5)


def _zipf_probabilities(ws: int, skew: float) -> npt.NDArray[np.float64]:
    weights: npt.NDArray[np.float64] = np.arange(1, ws + 1, dtype=np.float64) ** -skew
    return weights / float(weights.sum())


def _trace(kind: WorkloadKind, ws: int, skew: float = 1.0, seed: int = 7) -> list[int]:
    rng = np.random.default_rng(seed)
    if kind is WorkloadKind.UNIFORM:
        return [int(x) for x in rng.integers(0, ws, TRACE_REFS)]
    if kind is WorkloadKind.ZIPF:
        return [int(x) for x in rng.choice(ws, TRACE_REFS, p=_zipf_probabilities(ws, skew))]
    if kind is WorkloadKind.SCAN:
        return [i % ws for i in range(TRACE_REFS)]
    raise AssertionError(kind)


def _lru_miss_ratios(trace: Sequence[int], sizes: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """Every LRU cache size at once, from stack distances (LRU's inclusion property)."""
    stack: list[int] = []
    cold = len(set(trace)) + 1
    depths: list[int] = []
    for t, page in enumerate(trace):
        try:
            depth = stack.index(page)
        except ValueError:
            depth = cold
        else:
            del stack[depth]
        stack.insert(0, page)
        if t >= TRACE_WARMUP_REFS:
            depths.append(depth)
    counted = np.asarray(depths)
    # A reference at depth d hits in a cache of m pages exactly when d < m.
    return np.array([float(np.mean(counted >= m)) for m in sizes])


def _fifo_miss_ratio(trace: Sequence[int], size: int) -> float:
    queue: deque[int] = deque()
    resident: set[int] = set()
    misses = 0
    for t, page in enumerate(trace):
        if page in resident:
            continue
        if t >= TRACE_WARMUP_REFS:
            misses += 1
        if size == 0:
            continue
        if len(queue) == size:
            resident.discard(queue.popleft())
        queue.append(page)
        resident.add(page)
    return misses / (len(trace) - TRACE_WARMUP_REFS)


def _che_by_bisection(ws: int, skew: float, sizes: Sequence[int]) -> npt.NDArray[np.float64]:
    """Che's approximation solved directly: bisection on T, one grid point at a time."""
    p = _zipf_probabilities(ws, skew)
    out = []
    for m in sizes:
        if m == 0 or m >= ws:
            out.append(1.0 if m == 0 else 0.0)
            continue
        low, high = 0.0, 1.0
        while float(np.sum(-np.expm1(-p * high))) < m:
            high *= 2.0
        for _ in range(100):
            mid = (low + high) / 2.0
            if float(np.sum(-np.expm1(-p * mid))) < m:
                low = mid
            else:
                high = mid
        out.append(1.0 - float(np.sum(p * -np.expm1(-p * (low + high) / 2.0))))
    return np.array(out)


# --- exact curves -----------------------------------------------------------------------


def test_uniform_curve_is_the_resident_fraction() -> None:
    miss = uniform_miss_ratio(400, [0, 100, 200, 399, 400, 800])
    assert miss.tolist() == [1.0, 0.75, 0.5, 1.0 - 399 / 400, 0.0, 0.0]


def test_scan_curve_is_a_cliff_at_the_working_set() -> None:
    miss = scan_miss_ratio(400, [0, 1, 399, 400, 401])
    assert miss.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_idle_has_no_misses_and_no_demand() -> None:
    curve = miss_ratio_curve(Workload(WorkloadKind.IDLE), [0, 10, 1000])
    assert curve.miss_ratio.tolist() == [0.0, 0.0, 0.0]
    assert curve.demand_pages == 0


def test_curve_keeps_its_grid_and_reports_the_working_set_as_demand() -> None:
    curve = miss_ratio_curve(Workload(WorkloadKind.ZIPF, 300, skew=0.9), [0, 50, 300])
    assert curve.memory_pages.tolist() == [0, 50, 300]
    assert curve.demand_pages == 300


# --- against brute-force caches -----------------------------------------------------------


def test_uniform_matches_an_lru_simulation() -> None:
    simulated = _lru_miss_ratios(_trace(WorkloadKind.UNIFORM, TRACE_WS_PAGES), _SIZES)
    analytic = uniform_miss_ratio(TRACE_WS_PAGES, _SIZES)
    assert np.abs(simulated - analytic).max() < SIM_TOLERANCE


def test_scan_matches_an_lru_simulation_exactly() -> None:
    simulated = _lru_miss_ratios(_trace(WorkloadKind.SCAN, TRACE_WS_PAGES), _SIZES)
    assert simulated.tolist() == scan_miss_ratio(TRACE_WS_PAGES, _SIZES).tolist()


def test_scan_defeats_fifo_too() -> None:
    trace = _trace(WorkloadKind.SCAN, TRACE_WS_PAGES)
    for size in (1, TRACE_WS_PAGES - 1, TRACE_WS_PAGES):
        curve = miss_ratio_curve(Workload(WorkloadKind.SCAN, TRACE_WS_PAGES), [size])
        assert _fifo_miss_ratio(trace, size) == curve.miss_ratio[0]


@pytest.mark.parametrize("skew", [0.6, 1.0, 1.5])
def test_zipf_matches_an_lru_simulation(skew: float) -> None:
    simulated = _lru_miss_ratios(_trace(WorkloadKind.ZIPF, TRACE_WS_PAGES, skew), _SIZES)
    analytic = zipf_miss_ratio(TRACE_WS_PAGES, skew, _SIZES)
    assert np.abs(simulated - analytic).max() < SIM_TOLERANCE


@pytest.mark.parametrize("skew", [0.8, 1.2])
def test_zipf_fifo_matches_a_fifo_simulation(skew: float) -> None:
    trace = _trace(WorkloadKind.ZIPF, TRACE_WS_PAGES, skew)
    sizes = [10, 40, 100, 160]
    curve = miss_ratio_curve(
        Workload(WorkloadKind.ZIPF, TRACE_WS_PAGES, skew=skew), sizes, Replacement.FIFO
    )
    simulated = np.array([_fifo_miss_ratio(trace, m) for m in sizes])
    assert np.abs(simulated - curve.miss_ratio).max() < SIM_TOLERANCE
    # FIFO ignores hits, so it does worse than LRU on a skewed workload.
    assert np.all(curve.miss_ratio > zipf_miss_ratio(TRACE_WS_PAGES, skew, sizes))


@pytest.mark.parametrize(("ws", "skew"), [(200, 1.0), (5_000, 0.8), (20_000, 1.2), (3_000, 3.0)])
def test_zipf_solver_matches_che_solved_point_by_point(ws: int, skew: float) -> None:
    # Large working sets exercise the rank grouping and the interpolation in T.
    sizes = np.unique(np.linspace(0, ws, 41).astype(np.int64))
    exact = _che_by_bisection(ws, skew, sizes.tolist())
    assert np.abs(zipf_miss_ratio(ws, skew, sizes) - exact).max() < CHE_SOLVER_TOLERANCE


# --- properties -----------------------------------------------------------------------------

_workloads = st.builds(
    Workload,
    kind=st.sampled_from([WorkloadKind.UNIFORM, WorkloadKind.ZIPF, WorkloadKind.SCAN]),
    working_set_pages=st.integers(1, 2_000_000),
    skew=st.floats(0.05, 5.0),
)


@settings(max_examples=60, deadline=None)
@given(
    workload=_workloads,
    replacement=st.sampled_from(list(Replacement)),
    fractions=st.lists(st.floats(0.0, 1.5), min_size=1, max_size=30),
)
def test_every_curve_is_a_falling_probability_that_ends_at_zero(
    workload: Workload, replacement: Replacement, fractions: list[float]
) -> None:
    ws = workload.working_set_pages
    sizes = np.unique(np.array([0, ws, *[int(f * ws) for f in fractions]], dtype=np.int64))
    miss = miss_ratio_curve(workload, sizes, replacement).miss_ratio
    assert np.all((miss >= 0.0) & (miss <= 1.0))
    assert np.all(np.diff(miss) <= 1e-12)
    assert miss[0] == 1.0
    assert np.all(miss[sizes >= ws] == 0.0)


def test_rejects_sizes_that_are_not_whole_pages() -> None:
    with pytest.raises(ValueError, match="whole pages"):
        uniform_miss_ratio(100, [1.5])


def test_rejects_negative_sizes() -> None:
    with pytest.raises(ValueError, match="negative"):
        scan_miss_ratio(100, [-1])


def test_rejects_an_empty_working_set() -> None:
    with pytest.raises(ValueError, match="at least one page"):
        miss_ratio_curve(Workload(WorkloadKind.UNIFORM, 0), [0])


def test_rejects_a_non_positive_skew() -> None:
    with pytest.raises(ValueError, match="skew"):
        zipf_miss_ratio(100, 0.0, [10])
