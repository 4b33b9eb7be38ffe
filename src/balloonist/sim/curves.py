"""Exact miss-ratio curves for the oracle: analytic where exact, measured elsewhere.

A guest's curve depends on its workload, how much of the working set is active (a
ramp grows it; zipf ranks beyond it fold back onto it) and its replacement algorithm:

* **idle**: nothing is referenced, nothing misses.
* **uniform** over ``a`` active pages: ``1 - m / a`` under any replacement (exact).
* **scan** over ``a`` active pages: all miss below ``a``, none from ``a`` (exact for
  LRU, CLOCK and FIFO: each evicts the page needed next).
* **zipf**: measured with :mod:`balloonist.sim.cachesim` on the engine's own reference
  stream -- LRU in one stack-distance pass, CLOCK and FIFO one pass per size on a grid
  and interpolated in between -- because Che's approximation is only approximate,
  CLOCK is not LRU, and folded ranks follow no analytic curve.

The host's own paging has a curve too (:meth:`CurveBook.host_miss_ratio`): it evicts
frames at random, which on a scan keeps part of the set where a guest's own LRU, CLOCK
or FIFO keeps none. It is measured the same way (a pass per size) for zipf and scan.

Every measured curve is cached per (workload, active size, replacement); while a
zipf set ramps, the curves of the two nearest sizes on a ladder 19 % apart are
scaled to the size in use and blended (``_RAMP_LADDER_RATIO``).
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import numpy.typing as npt

from balloonist.sim import cachesim
from balloonist.sim.guest_memory import zipf_alias
from balloonist.sim.scenario import Replacement
from balloonist.sim.workload import Workload, WorkloadKind

FloatArray = npt.NDArray[np.float64]

#: References measured per active page, and the clamps on the total: enough that a
#: miss ratio of 1 % is measured to a few parts in a thousand of itself.
_REFS_PER_PAGE: Final = 16
_MIN_REFS: Final = 1 << 16
_MAX_REFS: Final = 1 << 22
#: CLOCK and FIFO need one pass per size, so each measures a quarter as many.
_RING_REFS_DIVISOR: Final = 4
#: While a zipf working set ramps, its active size changes every slice. It is measured
#: on a ladder of sizes this far apart, and a size between two rungs gets both rungs'
#: curves, scaled to its size and blended by where it lies between them (in log size),
#: so a ramp costs a few dozen measurements, not one per slice.
_RAMP_LADDER_RATIO: Final = 2.0**0.25
#: A rung is passed in a few slices: it is measured with half the references.
_RUNG_REFS_DIVISOR: Final = 2
#: Unrecorded references first, as a share of the recorded ones: the cache warms up.
_WARM_FRACTION: Final = 0.25
#: Sizes measured for CLOCK and FIFO, as fractions of the active set: log-spaced where
#: a skewed curve bends most, then every 1/8, and every 1/16 near the end.
_RING_GRID: Final = np.unique(
    np.concatenate((np.geomspace(1 / 512, 1 / 16, 6), np.arange(1, 9) / 8, np.arange(13, 16) / 16))
)
#: The stream's seed: any fixed value; the curve is a property of the workload.
_SEED: Final = 0x2545F4914F6CDD1D
#: A scan's stand-in for the zipf alias table, which it never reads.
_NO_ALIAS: Final = np.zeros((1, 2))


class CurveBook:
    """Miss ratios of workloads at given resident sizes, computed once per workload."""

    def __init__(self) -> None:
        # keyed by the cache simulator's policy code: a Replacement, or cachesim.RANDOM
        self._measured: dict[tuple[Workload, int, int], tuple[FloatArray, FloatArray]] = {}

    def miss_ratio(
        self,
        workload: Workload,
        active_pages: int,
        replacement: Replacement,
        resident_pages: npt.ArrayLike,
    ) -> FloatArray:
        """Steady-state miss ratio with ``resident_pages`` workload pages in memory."""
        m = np.asarray(resident_pages, dtype=np.float64)
        kind = workload.kind
        if kind is WorkloadKind.IDLE or active_pages <= 0:
            return np.zeros(m.shape)
        a = float(active_pages)
        if kind is WorkloadKind.UNIFORM:
            return np.clip(1.0 - m / a, 0.0, 1.0)
        if kind is WorkloadKind.SCAN:
            return np.where(m >= a, 0.0, 1.0)
        return self._blended(workload, active_pages, int(replacement), m)

    def host_miss_ratio(
        self, workload: Workload, active_pages: int, resident_pages: npt.ArrayLike
    ) -> FloatArray:
        """Steady-state miss ratio when the host holds ``resident_pages`` of the guest's
        working set and pages the rest out at random (the guest itself holds it all)."""
        m = np.asarray(resident_pages, dtype=np.float64)
        kind = workload.kind
        if kind is WorkloadKind.IDLE or active_pages <= 0:
            return np.zeros(m.shape)
        if kind is WorkloadKind.UNIFORM:
            return np.clip(1.0 - m / float(active_pages), 0.0, 1.0)
        return self._blended(workload, active_pages, cachesim.RANDOM, m)

    def _blended(
        self, workload: Workload, active_pages: int, policy: int, m: FloatArray
    ) -> FloatArray:
        a = float(active_pages)
        blended = np.zeros(m.shape)
        for rung, weight in _rungs(workload.working_set_pages, active_pages):
            sizes, miss = self._measure(workload, rung, policy)
            blended += weight * np.interp(m * (rung / a), sizes, miss)
        return np.where(m >= a, 0.0, blended)

    def _measure(
        self, workload: Workload, active_pages: int, policy: int
    ) -> tuple[FloatArray, FloatArray]:
        key = (workload, active_pages, policy)
        cached = self._measured.get(key)
        if cached is None:
            cached = measure_curve(workload, active_pages, policy)
            self._measured[key] = cached
        return cached


def _rungs(working_set_pages: int, active_pages: int) -> list[tuple[int, float]]:
    """The measured active sizes standing in for ``active_pages``, with their weights:
    itself once the ramp is done, else the ladder's rungs (``working_set / ratio**k``)
    just below and just above it."""
    if active_pages >= working_set_pages:
        return [(working_set_pages, 1.0)]
    log_ratio = math.log(_RAMP_LADDER_RATIO)
    k = math.floor(math.log(working_set_pages / active_pages) / log_ratio)
    above = working_set_pages / _RAMP_LADDER_RATIO**k
    below = above / _RAMP_LADDER_RATIO
    weight_above = 1.0 - math.log(above / active_pages) / log_ratio
    above_pages = min(max(round(above), 1), working_set_pages)
    below_pages = max(round(below), 1)
    if weight_above >= 1.0 or below_pages == above_pages:
        return [(above_pages, 1.0)]
    return [(below_pages, 1.0 - weight_above), (above_pages, weight_above)]


def measure_zipf(
    workload: Workload, active_pages: int, replacement: Replacement
) -> tuple[FloatArray, FloatArray]:
    """(sizes, miss ratios) of a zipf workload folded onto ``active_pages``, measured."""
    return measure_curve(workload, active_pages, int(replacement))


def measure_curve(
    workload: Workload, active_pages: int, policy: int
) -> tuple[FloatArray, FloatArray]:
    """(sizes, miss ratios) of a zipf or scan workload on ``active_pages``, measured
    under ``policy`` (a Replacement, or ``cachesim.RANDOM`` for the host's paging)."""
    # per rank: (probability, alias rank as a float), as the engine draws from it; a
    # scan draws nothing from it
    alias = zipf_alias(workload) if workload.kind is WorkloadKind.ZIPF else _NO_ALIAS
    args = (int(workload.kind), workload.working_set_pages, active_pages, alias, _SEED)
    count = int(np.clip(_REFS_PER_PAGE * active_pages, _MIN_REFS, _MAX_REFS))
    if active_pages < workload.working_set_pages:
        count //= _RUNG_REFS_DIVISOR
    if policy == int(Replacement.LRU):
        warm = int(count * _WARM_FRACTION)
        hist = cachesim.lru_distance_histogram(warm, count, *args)
        # hit with m pages: distance below m; so miss(m) = 1 - sum(hist[:m]) / count
        hits = np.concatenate(([0], np.cumsum(hist)))
        sizes = np.arange(active_pages + 1, dtype=np.float64)
        return sizes, 1.0 - hits / count
    count //= _RING_REFS_DIVISOR
    warm = int(count * _WARM_FRACTION)
    grid = np.unique(np.clip(np.round(_RING_GRID * active_pages), 1, active_pages))
    misses = cachesim.ring_misses_grid(policy, grid.astype(np.int64), warm, count, *args)
    return np.concatenate(([0.0], grid)), np.concatenate(([1.0], misses / count))
