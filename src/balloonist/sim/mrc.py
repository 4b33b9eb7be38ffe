"""Miss-ratio curves of the simulator's workloads, computed analytically.

A miss-ratio curve gives, for each amount of memory ``m`` (in pages) a guest keeps
resident for its workload, the steady-state fraction of references that miss. All
workloads here follow the independent reference model (each reference drawn from a
fixed distribution over the working set of ``W`` pages), except the scan, which is
deterministic:

* **uniform**: every resident page is equally likely to be hit, whatever the
  replacement algorithm, so ``miss = 1 - m / W`` for ``m < W`` (exact).
* **scan** (``0, 1, ..., W-1, 0, ...``): LRU, CLOCK and FIFO all evict exactly the page
  needed next, so ``miss = 1`` for ``m < W`` and ``0`` once the whole set fits (exact).
* **zipf** (rank ``r`` has probability ``~ 1 / r**skew``): Che's approximation for LRU.
  A page stays cached for a *characteristic time* ``T`` after its last reference, so
  it is resident with probability ``1 - exp(-p_i T)``; ``T`` is where those add up to
  ``m`` and ``hit = sum_i p_i (1 - exp(-p_i T))``. FIFO uses the same idea with
  residence ``p_i T / (1 + p_i T)`` (Martina, Garetto and Leonardi, 2014). CLOCK sits
  between the two and is modelled as LRU, which it was designed to approximate.
* **idle**: no references, so miss ratio ``0`` and no memory demand.

Every curve is exact at ``m = 0`` (all miss) and ``m >= W`` (none miss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from balloonist.sim.scenario import Replacement
from balloonist.sim.workload import Workload, WorkloadKind

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: The most popular ranks keep one entry each: there single pages decide the hit ratio.
_EXACT_RANKS: Final = 256
#: Beyond the head, ranks are pooled in bins 1 % wide; within a bin ``p`` varies by at
#: most 5 % (skew <= 5), which moves the curve by ~1e-4, and a million-page working
#: set shrinks to ~1,400 groups.
_BIN_RATIO: Final = 1.01
#: Points per decade of the characteristic time: consecutive points are 7.5 % apart,
#: so linear interpolation between them is good to ~1e-4 in the miss ratio.
_T_POINTS_PER_DECADE: Final = 32
#: A first, coarse pass (two points per decade) finds where the miss ratio has fallen
#: below this; beyond it the curve is drawn straight to (W, 0), an error of at most
#: this much. It spares steep curves (skew 5) most of their 25-odd decades of ``T``.
_NEGLIGIBLE_MISS: Final = 1e-9
_COARSE_POINTS_PER_DECADE: Final = 2


@dataclass(frozen=True, eq=False)
class MissRatioCurve:
    """A workload's miss ratio sampled at ``memory_pages`` (resident workload pages)."""

    memory_pages: IntArray
    miss_ratio: FloatArray
    demand_pages: int  # memory beyond which the miss ratio no longer falls (0: idle)


def miss_ratio_curve(
    workload: Workload,
    memory_pages: npt.ArrayLike,
    replacement: Replacement = Replacement.LRU,
) -> MissRatioCurve:
    """The curve of ``workload`` under ``replacement``, sampled at ``memory_pages``."""
    grid = _grid(memory_pages)
    kind = workload.kind
    if kind is WorkloadKind.IDLE:
        return MissRatioCurve(grid, np.zeros(grid.shape, dtype=np.float64), 0)
    ws = workload.working_set_pages
    if kind is WorkloadKind.UNIFORM:
        miss = uniform_miss_ratio(ws, grid)
    elif kind is WorkloadKind.SCAN:
        miss = scan_miss_ratio(ws, grid)
    elif kind is WorkloadKind.ZIPF:
        miss = zipf_miss_ratio(ws, workload.skew, grid, fifo=replacement is Replacement.FIFO)
    else:  # pragma: no cover - WorkloadKind is closed; a new kind must be modelled here
        raise ValueError(f"no miss-ratio model for workload kind {kind!r}")
    return MissRatioCurve(grid, miss, ws)


def uniform_miss_ratio(working_set_pages: int, memory_pages: npt.ArrayLike) -> FloatArray:
    ws = _working_set(working_set_pages)
    grid = _grid(memory_pages)
    return np.clip(1.0 - grid / ws, 0.0, 1.0)


def scan_miss_ratio(working_set_pages: int, memory_pages: npt.ArrayLike) -> FloatArray:
    ws = _working_set(working_set_pages)
    grid = _grid(memory_pages)
    return np.where(grid >= ws, 0.0, 1.0)


def zipf_miss_ratio(
    working_set_pages: int, skew: float, memory_pages: npt.ArrayLike, *, fifo: bool = False
) -> FloatArray:
    """Che's approximation (LRU, or FIFO with ``fifo=True``) on a whole grid at once.

    Rather than solving for ``T`` at each grid point, the occupancy ``m(T)`` and hit
    ratio ``h(T)`` are evaluated on a log-spaced grid of ``T`` in one matrix product;
    both rise monotonically with ``T``, so ``h`` as a function of ``m`` is read off by
    interpolation.
    """
    ws = _working_set(working_set_pages)
    if not skew > 0.0:
        raise ValueError(f"zipf skew must be positive, got {skew}")
    grid = _grid(memory_pages)
    prob, count = _zipf_groups(ws, skew)
    mass = prob * count
    p_min = float(prob.min())
    # Occupancy m(T) <= T (each residence probability is at most p_i T), so T = 1/2
    # starts below one page. The top is where at most half a page is still missing:
    # W exp(-p_min T) <= 1/2 for LRU, W / (p_min T) <= 1/2 for FIFO.
    t_low = 0.5
    t_high = max((2.0 * ws if fifo else math.log(2.0 * ws)) / p_min, 2.0 * t_low)
    coarse = _log_grid(t_low, t_high, _COARSE_POINTS_PER_DECADE)
    negligible = np.flatnonzero(_residence(coarse, prob, fifo) @ mass > 1.0 - _NEGLIGIBLE_MISS)
    if negligible.size:
        t_high = max(float(coarse[negligible[0]]), 2.0 * t_low)
    resident = _residence(_log_grid(t_low, t_high, _T_POINTS_PER_DECADE), prob, fifo)
    occupancy = resident @ count
    hit = resident @ mass
    occupancy_nodes = np.concatenate(([0.0], occupancy, [float(ws)]))
    hit_nodes = np.concatenate(([0.0], hit, [1.0]))
    miss = 1.0 - np.interp(grid.astype(np.float64), occupancy_nodes, hit_nodes)
    # Exact at the ends, whatever rounding did in between.
    return np.where(grid >= ws, 0.0, np.clip(miss, 0.0, 1.0))


def _log_grid(low: float, high: float, per_decade: int) -> FloatArray:
    return np.geomspace(low, high, math.ceil(math.log10(high / low) * per_decade) + 1)


def _residence(times: FloatArray, prob: FloatArray, fifo: bool) -> FloatArray:
    """Probability that each page group is resident, one row per characteristic time."""
    x = np.outer(times, prob)
    if fifo:
        return x / (1.0 + x)
    return -np.expm1(-x)


def _zipf_groups(working_set_pages: int, skew: float) -> tuple[FloatArray, FloatArray]:
    """Reference probability per page and page count of each rank group.

    The head's weights ``r**-skew`` are summed exactly; each tail bin's by the midpoint
    integral (``r`` from ``a + 1/2`` to ``b + 1/2``), good to ~1e-5 relative past rank
    256, so the cost does not grow with the working set.
    """
    head = min(working_set_pages, _EXACT_RANKS)
    head_weight = np.arange(1, head + 1, dtype=np.float64) ** -skew
    if working_set_pages <= _EXACT_RANKS:
        return head_weight / head_weight.sum(), np.ones_like(head_weight)
    bins = math.ceil(math.log(working_set_pages / _EXACT_RANKS) / math.log(_BIN_RATIO)) + 1
    edges = np.unique(
        np.append(
            np.floor(_EXACT_RANKS * _BIN_RATIO ** np.arange(bins)).clip(max=working_set_pages),
            working_set_pages,
        )
    )
    low, high = edges[:-1] + 0.5, edges[1:] + 0.5
    # integral of x**-skew from low to high, written to stay exact as skew -> 1
    u = 1.0 - skew
    log_ratio = np.log(high / low)
    scale = log_ratio if u == 0.0 else np.expm1(u * log_ratio) / u
    tail_weight = low**u * scale
    weight = np.concatenate((head_weight, tail_weight))
    count = np.concatenate((np.ones(head), np.diff(edges)))
    return weight / weight.sum() / count, count


def _grid(memory_pages: npt.ArrayLike) -> IntArray:
    grid = np.asarray(memory_pages)
    if grid.dtype.kind not in "iu":
        raise ValueError(f"memory sizes must be whole pages (integers), got dtype {grid.dtype}")
    grid = grid.astype(np.int64)
    if grid.size and int(grid.min()) < 0:
        raise ValueError("memory sizes must not be negative")
    return grid


def _working_set(working_set_pages: int) -> int:
    if working_set_pages < 1:
        raise ValueError(f"a working set needs at least one page, got {working_set_pages}")
    return working_set_pages
