"""ESX proportional shares with the idle tax, for memory and for processors: min-funding
revocation.

Each guest holds ``S`` shares. Its *shares-per-page ratio* is

    rho = S / (P * (f + k * (1 - f))),     k = 1 / (1 - tau),   f = min(1, A / P)

where ``P`` is the machine memory the guest has, ``A`` its estimated working set (the
active pages), ``f`` the active fraction and ``tau`` the idle memory tax rate. An idle
page costs ``k`` times an active one, so a guest hoarding idle memory "pays" less per
page and is the first victim. Min-funding revocation repeatedly takes a page from the
guest with the lowest ``rho`` and gives it to whoever asks; it stops changing anything
when no page can move from a lower-``rho`` guest to a higher one, i.e. when every guest
that is not held at its reservation (``min``) or limit (``max``) has the same ``rho``.

This module computes that fixed point directly instead of simulating the page-by-page
auction: for a common ratio ``lambda`` each guest's allocation is the ``P`` solving
``rho(P) = lambda``, clamped to ``[min, max]``; the total is monotone in ``lambda``,
so a bisection finds the ``lambda`` whose allocations add up to the memory on offer.
The maths, with worked numbers, is in ``docs/policy.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from balloonist.errors import ConfigError
from balloonist.model import (
    CpuTarget,
    Decision,
    GuestTarget,
    GuestView,
    HostState,
    Mechanisms,
    Snapshot,
)
from balloonist.units import PAGE_SIZE_BYTES, format_size

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

#: ESX's default idle memory tax (``Mem.IdleTax`` = 75 %): an idle page costs 4 active ones.
DEFAULT_TAX_RATE: Final = 0.75

#: Leave the host's "high" threshold (6 %) free, so the equilibrium sits in the HIGH state
#: and reclamation starts only when guests grow past their targets.
DEFAULT_FREE_TARGET_FRACTION: Final = 0.06

#: A processor the shares split between guests goes to one of them for this long, then
#: the rounding moves on (see cpu_targets): long enough that vCPUs do not go off- and
#: online every period, short enough that each guest gets its fraction within minutes.
CPU_ROUNDING_ROUND_S: Final = 10.0
#: The offsets of successive rounds follow the golden ratio's multiples: they spread
#: evenly over [0, 1) however many rounds there are.
_GOLDEN: Final = (math.sqrt(5.0) - 1.0) / 2.0

#: Bisection steps before giving up on an exact finish; float64 runs out of resolution
#: long before (each step halves the bracket, 2**-200 is far below one page).
_MAX_BISECTION_STEPS: Final = 200

# Regime codes of one guest at a given ratio, in the order they occur as the ratio falls
# (pages per share rise): held at min, untaxed (S*x <= A), taxed (S*x > A), held at max.
_AT_MIN: Final = 0
_UNTAXED: Final = 1
_TAXED: Final = 2
_AT_MAX: Final = 3


def idle_cost_factor(tax_rate: float) -> float:
    """``k = 1 / (1 - tau)``: how many active pages one idle page costs."""
    _check_tax_rate(tax_rate)
    return 1.0 / (1.0 - tax_rate)


def shares_per_page(
    shares: float, allocation_bytes: float, working_set_bytes: float, tax_rate: float
) -> float:
    """The ratio ``rho`` (shares per page) of one guest; ``inf`` for an empty guest."""
    pages = allocation_bytes / PAGE_SIZE_BYTES
    if pages <= 0:
        return math.inf
    k = idle_cost_factor(tax_rate)
    active = min(1.0, working_set_bytes / allocation_bytes)
    return shares / (pages * (active + k * (1.0 - active)))


def equilibrium_units(
    shares: F64,
    active_units: F64,
    min_units: I64,
    max_units: I64,
    *,
    available_units: int,
    tax_rate: float,
    rounding_offset: float = 0.0,
) -> I64:
    """Whole units of one resource (memory pages, processors) for each guest, so that
    ``rho`` is equal among guests not held at a bound: the policy's one equilibrium,
    for every resource it shares.

    With ``x = 1 / lambda`` (units per share), a guest whose active part is ``A`` units
    gets ``P(x) = S*x`` while ``S*x <= A`` (it is all active, no tax applies) and
    ``P(x) = (S*x + (k - 1)*A) / k`` beyond that (the idle part is taxed), clamped to
    ``[min, max]``. The sum is non-decreasing in ``x``, so bisection brackets the
    answer; once every guest keeps one regime across the bracket, the sum is linear
    in ``x`` and is solved exactly.

    The exact shares are then rounded to whole units: floors first, then the units
    that flooring left over go one each to guests with a fraction, by systematic
    rounding at ``rounding_offset`` in [0, 1) (see :func:`_hand_out`): a caller that
    moves the offset over time gives each guest its fraction on average, where a
    fixed rule would hand the odd unit to the same guest forever. For memory that is a
    few pages; for a handful of processors it is most of the point. The result is
    never below ``min`` or above ``max`` and adds up to at most ``available_units``,
    unless the reservations alone exceed it (then everyone gets exactly ``min``).
    Raises :class:`ConfigError` if a guest's ``min`` is above its ``max``.
    """
    k = idle_cost_factor(tax_rate)
    if bool(np.any(min_units > max_units)):
        raise ConfigError("a guest's min and max leave no whole unit between them")
    available = max(0, available_units)
    if int(max_units.sum()) <= available:
        return max_units.copy()
    if int(min_units.sum()) >= available:
        return min_units.copy()

    supply = _Supply(
        s=shares.astype(np.float64),
        a=active_units.astype(np.float64),
        lo_b=min_units.astype(np.float64),
        hi_b=max_units.astype(np.float64),
        k=k,
    )
    exact, _ = supply.at(supply.solve(float(available)))
    return _whole_units(exact, min_units, max_units, available, rounding_offset)


class _Supply:
    """Each guest's units at ``x`` units per share (see :func:`equilibrium_units`)."""

    def __init__(self, *, s: F64, a: F64, lo_b: F64, hi_b: F64, k: float) -> None:
        self.s, self.a, self.lo_b, self.hi_b, self.k = s, a, lo_b, hi_b, k
        self.taxed_offset = (k - 1.0) * a

    def at(self, x: float) -> tuple[F64, npt.NDArray[np.int8]]:
        """The units, and each guest's regime (at min, untaxed, taxed, at max)."""
        sx = self.s * x
        raw = np.where(sx <= self.a, sx, (sx + self.taxed_offset) / self.k)
        inside = np.where(sx <= self.a, _UNTAXED, _TAXED)
        regime = np.where(raw <= self.lo_b, _AT_MIN, np.where(raw >= self.hi_b, _AT_MAX, inside))
        return np.clip(raw, self.lo_b, self.hi_b), regime.astype(np.int8)

    def solve(self, target: float) -> float:
        """The ``x`` whose units add up to ``target``: bisection until every guest keeps
        one regime across the bracket, then exactly (the sum is linear there)."""
        s, k, lo_b, hi_b = self.s, self.k, self.lo_b, self.hi_b
        # P(x) <= S*x always, so x = 0 puts everyone at min; P(x) >= S*x/k always, so
        # at x = max(k * max / S) everyone is at max. The answer lies between.
        lo, hi = 0.0, float(np.max(k * hi_b / s))
        _, regime_lo = self.at(lo)
        _, regime_hi = self.at(hi)
        for _ in range(_MAX_BISECTION_STEPS):
            if np.array_equal(regime_lo, regime_hi):
                break
            mid = 0.5 * (lo + hi)
            if mid <= lo or mid >= hi:
                break  # float resolution reached
            units, regime = self.at(mid)
            if float(units.sum()) <= target:
                lo, regime_lo = mid, regime
            else:
                hi, regime_hi = mid, regime
        if not np.array_equal(regime_lo, regime_hi):
            return lo
        # One regime per guest across [lo, hi]: sum(P) = fixed + slope * x, exactly.
        untaxed = regime_lo == _UNTAXED
        taxed = regime_lo == _TAXED
        fixed = float(
            lo_b[regime_lo == _AT_MIN].sum()
            + hi_b[regime_lo == _AT_MAX].sum()
            + (self.taxed_offset[taxed] / k).sum()
        )
        slope = float(s[untaxed].sum() + (s[taxed] / k).sum())
        return min(hi, max(lo, (target - fixed) / slope)) if slope > 0.0 else lo


def _whole_units(
    exact: F64, min_units: I64, max_units: I64, available: int, rounding_offset: float
) -> I64:
    """``exact`` in whole units: floors, then what they left over by systematic rounding
    (see :func:`equilibrium_units`), never outside ``[min, max]``."""
    whole = np.clip(np.floor(exact).astype(np.int64), min_units, max_units)
    left = available - int(whole.sum())
    fractions = np.clip(exact - whole, 0.0, 1.0)
    # Floats may make the fractions add up to a hair less than the units left over.
    left = min(left, int(np.floor(fractions.sum() + 1e-6)))
    if left > 0:
        _hand_out(whole, fractions * (left / fractions.sum()), left, rounding_offset % 1.0)
        np.minimum(whole, max_units, out=whole)  # a point on a float edge never breaks a max
    else:
        _trim(whole, min_units, left)
    return whole


def equilibrium_bytes(
    shares: F64,
    working_set_bytes: F64,
    min_bytes: I64,
    max_bytes: I64,
    *,
    available_bytes: int,
    tax_rate: float,
) -> I64:
    """:func:`equilibrium_units` for memory, in whole pages, given and returned in bytes.

    A reservation is rounded up to whole pages (never cut), a limit down. Raises
    :class:`ConfigError` if ``min`` and ``max`` leave a guest no whole page.
    """
    min_pages = -(-min_bytes // PAGE_SIZE_BYTES)
    max_pages = max_bytes // PAGE_SIZE_BYTES
    if bool(np.any(min_pages > max_pages)):
        raise ConfigError("a guest's min and max leave no whole page between them")
    pages = equilibrium_units(
        shares,
        working_set_bytes.astype(np.float64) / PAGE_SIZE_BYTES,
        min_pages,
        max_pages,
        available_units=max(0, available_bytes) // PAGE_SIZE_BYTES,
        tax_rate=tax_rate,
    )
    return pages * PAGE_SIZE_BYTES


def _hand_out(units: I64, fractions: F64, count: int, offset: float) -> None:
    """Systematic rounding: lay the fractions end to end and give a unit to each guest
    whose stretch holds one of the points ``offset, offset + 1, ...``. Exactly
    ``count`` units go out (the fractions add up to it), and a guest gets one with
    probability equal to its fraction as the offset moves."""
    edges = np.concatenate(([0.0], np.cumsum(fractions)))
    points = offset + np.arange(count, dtype=np.float64)
    hits = np.searchsorted(edges, points, side="right") - 1
    np.add.at(units, np.clip(hits, 0, len(units) - 1), 1)


def _trim(units: I64, min_units: I64, headroom_units: int) -> None:
    """Take back units that float rounding granted beyond the budget (a handful at most).

    Largest slack first, ties by position, so the result stays deterministic.
    """
    if headroom_units >= 0:
        return
    excess = -headroom_units
    slack = units - min_units
    for i in np.argsort(-slack, kind="stable"):
        take = min(excess, int(slack[i]))
        units[i] -= take
        excess -= take
        if excess == 0:
            return


def guest_arrays(guests: Sequence[GuestView]) -> tuple[F64, F64, I64, I64]:
    """Shares, working sets, mins and maxes of ``guests`` as arrays, in order."""
    n = len(guests)
    shares = np.fromiter((g.spec.shares for g in guests), dtype=np.float64, count=n)
    working = np.fromiter((g.working_set_bytes for g in guests), dtype=np.float64, count=n)
    mins = np.fromiter((g.spec.min_bytes for g in guests), dtype=np.int64, count=n)
    maxes = np.fromiter((g.spec.limit_bytes for g in guests), dtype=np.int64, count=n)
    return shares, working, mins, maxes


def check_reservations(snapshot: Snapshot) -> None:
    """Refuse a snapshot whose reservations cannot all be met (no policy could)."""
    _check_reserved(sum(g.spec.min_bytes for g in snapshot.guests), snapshot.host.memory_bytes)


def _check_reserved(reserved_bytes: int, host_memory_bytes: int) -> None:
    if reserved_bytes > host_memory_bytes:
        raise ConfigError(
            f"the guests' reservations add up to {format_size(reserved_bytes)}, more than "
            f"host memory {format_size(host_memory_bytes)}"
        )


def shares_allocations(snapshot: Snapshot, tax_rate: float, free_target_fraction: float) -> I64:
    """The min-funding equilibrium for ``snapshot``, in bytes, one entry per guest."""
    memory = snapshot.host.memory_bytes
    shares, working, mins, maxes = guest_arrays(snapshot.guests)
    _check_reserved(sum(mins.tolist()), memory)  # Python ints: no int64 overflow
    available = min(memory, math.floor(memory * (1.0 - free_target_fraction)))
    return equilibrium_bytes(
        shares, working, mins, maxes, available_bytes=available, tax_rate=tax_rate
    )


class SharesPolicy:
    """ESX memory management: proportional shares, idle memory tax, host states.

    Allocation targets are the min-funding equilibrium over ``host memory x (1 -
    free_target_fraction)``. The balloon register gets ``memory - allocation``, with
    one exception: in :attr:`HostState.HIGH` nothing is reclaimed. Reclaiming costs
    the guest work and possibly its own paging; while the host has plenty free there
    is nothing to gain from it, and ESX waits for free memory to fall below the soft
    threshold before it takes memory back. In HIGH the register only holds each guest
    at the larger of its target and its current use (see :func:`register_bytes`). The
    limit (``max``) is a limit in every state: the balloon never drops below
    ``memory - max``. In HIGH a guest may therefore hold more than its allocation
    target; the target stays the entitlement, which the host enforces by paging once
    the state reaches HARD.

    Guests without a balloon driver get register 0: the host can only take memory
    from them by paging behind their backs (HARD and LOW states).
    """

    def __init__(
        self,
        tax_rate: float = DEFAULT_TAX_RATE,
        free_target_fraction: float = DEFAULT_FREE_TARGET_FRACTION,
    ) -> None:
        _check_tax_rate(tax_rate)
        if not 0.0 <= free_target_fraction < 1.0:
            raise ValueError(f"free target fraction must be in [0, 1), got {free_target_fraction}")
        self.tax_rate = tax_rate
        self.free_target_fraction = free_target_fraction

    @property
    def name(self) -> str:
        return "shares"

    def decide(self, snapshot: Snapshot) -> Decision:
        state = snapshot.host.state
        guests = snapshot.guests
        allocations = shares_allocations(snapshot, self.tax_rate, self.free_target_fraction)
        registers = register_bytes(guests, allocations, state)
        cpus = cpu_targets(snapshot, self.tax_rate)
        targets = tuple(
            GuestTarget(g.spec.name, alloc, register, cpus.get(g.spec.name))
            for g, alloc, register in zip(
                guests, allocations.tolist(), registers.tolist(), strict=True
            )
        )
        return Decision(targets, Mechanisms.for_state(state))


def cpu_targets(snapshot: Snapshot, tax_rate: float) -> dict[str, CpuTarget]:
    """Processors for the guests that share the host's: the memory policy's own
    equilibrium (:func:`equilibrium_units`) in whole CPUs, over every processor (no
    free target: an idle processor saves nothing), with each guest's smoothed CPU
    demand as its active part, so idle vCPUs are taxed as idle pages are.

    The CPU balloon register is ``vcpus - allocation``: the guest keeps as many vCPUs
    online as it is granted processors. When the reservations (at least one vCPU
    each) exceed the host's processors, every guest is held at its reservation and
    the host time-slices what is left online. Guests without a CPU balloon get
    register 0.

    A processor the shares split (two equal busy guests on three processors) cannot
    be split: the rounding gives it to one guest per round of CPU_ROUNDING_ROUND_S of
    the snapshot's time, moving its offset every round, so over time each guest gets
    its share (1.5 each) instead of the same guest always getting the odd one.
    """
    host_cpus = snapshot.host.cpus
    sharing = [g for g in snapshot.guests if g.spec.cpu is not None and g.sample.cpu is not None]
    if host_cpus is None or not sharing:
        return {}
    specs = [g.spec.cpu for g in sharing if g.spec.cpu is not None]
    demand = [
        g.cpu_demand_vcpus if g.cpu_demand_vcpus is not None else float(c.vcpus)
        for g, c in zip(sharing, specs, strict=True)
    ]
    allocations = equilibrium_units(
        np.array([c.shares for c in specs], dtype=np.float64),
        np.array(demand, dtype=np.float64),
        np.array([c.min_cpus for c in specs], dtype=np.int64),
        np.array([c.limit_cpus for c in specs], dtype=np.int64),
        available_units=host_cpus,
        tax_rate=tax_rate,
        rounding_offset=(math.floor(snapshot.time_s / CPU_ROUNDING_ROUND_S) * _GOLDEN) % 1.0,
    )
    return {
        g.spec.name: CpuTarget(alloc, c.vcpus - alloc if c.balloon else 0)
        for g, c, alloc in zip(sharing, specs, allocations.tolist(), strict=True)
    }


def register_bytes(guests: Sequence[GuestView], allocations: I64, state: HostState) -> I64:
    """Balloon register values for ``allocations`` in ``state`` (see :class:`SharesPolicy`).

    Outside HIGH: ``memory - allocation``. In HIGH the guest is held at the larger of
    its allocation and the machine memory it uses now (never above its limit), so
    nothing it uses is taken back while the host has plenty free.
    """
    n = len(guests)
    memory = np.fromiter((g.spec.memory_bytes for g in guests), dtype=np.int64, count=n)
    ballooning = np.fromiter((g.spec.balloon for g in guests), dtype=np.bool_, count=n)
    size = allocations
    if state is HostState.HIGH:
        used = np.fromiter((g.sample.allocated_bytes for g in guests), dtype=np.int64, count=n)
        used = np.maximum(used, 0) // PAGE_SIZE_BYTES * PAGE_SIZE_BYTES
        limits = np.fromiter((g.spec.limit_bytes for g in guests), dtype=np.int64, count=n)
        size = np.minimum(limits, np.maximum(allocations, used))  # the limit holds always
    return np.where(ballooning, memory - size, 0)


def _check_tax_rate(tax_rate: float) -> None:
    if not 0.0 <= tax_rate < 1.0:
        raise ValueError(f"idle memory tax rate must be in [0, 1), got {tax_rate}")
