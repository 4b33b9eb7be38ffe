"""The default policy: each guest's demand, met by shares where it cannot all be met.

The ESX shares policy (:mod:`balloonist.policy.shares`) splits memory by shares and
taxes idle pages, but it cannot see a guest that needs *more* than it holds: a guest
short of memory touches everything it has, so its sampled working set is exactly its
allocation, and it thrashes at its share while idle guests keep a quarter of what
they once used. This policy starts from demand instead:

1. **Demand** of each guest, from the signals real guests give:
   - its working set (sampled page activity, ESX-style) plus headroom;
   - its pressure: a guest stalled on memory (PSI's "some" share of time, or its
     major-fault rate where stall time is not reported) wants more than it may hold
     now, so its demand is its current allowance plus a step that grows with the
     stall; a guest that stalls a little keeps what it uses; a quiet one wants no
     more than it may use now (the headroom above that is a guess, and serving it
     would take pages from guests that use them), and one without a balloon no more
     than it uses;
   - a guest not short whose use and working set both grow wants the next few seconds
     of its growth too, past what it may hold now (its *lead*, at most a stalled
     guest's smallest step): asked by its stall, the memory would come periods late;
   - a guest that runs short all at once (its available memory under the daemon's
     floor this period: a burst of allocations, where without swap the next step is
     its OOM killer) wants what it lacks, what it used in the last interval (the
     burst goes on while memory is freed for it) and a step, at once (the *rescue*);
   - while any guest is under pressure, the others' demand follows their *recent*
     working set (the fast average), so memory they stopped using goes to the guest
     that stalls without waiting out the slow average;
   - except where the guest under pressure is *futile* (``policy/futility.py``): it
     thrashed before at far more memory and barely worked more there (a uniform set
     or a scan that does not fit). It wants what it may hold now, and the others
     keep their slow average's memory: a guest between two busy phases would fault
     its set back for nothing.
2. **Allocation** by weighted water-filling: every guest gets its demand up to a
   common level of memory per share; guests that want more than that level share
   what is left by their shares. So shares decide who wins when every guest needs
   more, a guest never gets less than the smaller of its demand and the level its
   shares give it, and idle memory (held but not demanded) is the first to go: the
   idle tax at its strongest. Memory left over goes first to guests that stall (by
   shares, up to their limits: their demand is a step, and they may need more), then
   to guests still growing, as far as they would grow into it in the next seconds
   (their *runway*: a guest cut back to what it touched stalls again at once), then
   stays with the guests that hold it as far as their working set (with the slow
   average's memory) says they used it, then goes to guests still growing as far as
   they would grow in the next seconds past what they may use now (their *reach*:
   memory nobody uses, where a fast grower finds it without waiting for a
   decision), then is spread by shares: memory in use is
   not reclaimed when nobody needs it, and memory a guest stopped using drifts back
   to the others by shares as the slow average forgets it.
   Reservations (``min``) and limits (``max``) bound every step; the allocations add
   up to the host less a small margin (``DEFAULT_MARGIN_FRACTION``). Pages a guest holds
   are taken only where no other guest's surplus from the last pass covers them
   (``defer_squeezes``). When two or more guests thrash at once they take turns
   instead of all thrashing together (``policy/loadcontrol.py``); the holder of a
   turn may grow to its limit while it stalls, and wants only what it uses once it
   does not.
3. **Balloon registers** partition the host: a guest may use at most
   ``memory - register`` and the allocations add up to the host less a small margin,
   so a guest whose demand jumps pages inside itself (its own choice of victims),
   never the host behind its back. A growing guest's balloon deflates only into
   memory that is free now, so one guest cannot outrun the others' inflation and
   push the host into paging; on real VMs "free now" is what the host counts free
   where that is more than the balloons' sizes say (``free_now_bytes``). Small
   inflations are not worth a balloon move (dead band); deflations always go ahead.

Guests without a balloon driver, or whose balloon stopped following its register,
can only be held to their allocation by host paging, which this policy allows in the
HARD and LOW host states, for them alone (``Mechanisms.host_paging_ballooned`` off).
A guest that cannot work ballooned under its own limit, or under its share of a full
host (a scan just past what either leaves it), may be held there by the host instead,
where a trial measures that it works better (``policy/limitpaging.py``): its balloon
deflates, and its target asks the host to page it past its allocation
(``GuestTarget.host_capped``).
LOW also stops guests above their target from taking more machine memory, as ESX
does; the margin is small, so a host whose memory is all handed out sits there.
Processors are shared as the shares policy shares them
(:func:`balloonist.policy.shares.cpu_targets`). The maths, with worked numbers, is in
``docs/policy.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from balloonist.model import (
    Decision,
    GuestTarget,
    GuestView,
    HostSample,
    HostState,
    Mechanisms,
    Snapshot,
)
from balloonist.policy.futility import Futility
from balloonist.policy.growth import UseGrowth
from balloonist.policy.limitpaging import LimitPaging
from balloonist.policy.loadcontrol import LoadControl
from balloonist.policy.shares import (
    DEFAULT_TAX_RATE,
    check_reservations,
    cpu_targets,
    equilibrium_bytes,
)
from balloonist.units import MIB, PAGE_SIZE_BYTES

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

#: Share of the host no guest is allotted: room for the moments when one balloon is
#: still deflating while another has not yet inflated. Small, because a growing
#: guest deflates only into memory free now (``registers_bytes``), and every page
#: held back may be the one a guest at its working set's edge lacks: at 2 % the
#: worst suite host's scan fit 3 MiB short all run (suite-1-135, 0.59 of the bound;
#: 0.70 at 0.5 %, and 0.80 once quiet guests also want no more than they may hold).
#: A host so partitioned sits in the LOW state (see the module docstring).
DEFAULT_MARGIN_FRACTION: Final = 0.005
#: Headroom over the working set: sampling misses pages touched less often than once a
#: window, and a guest's page cache needs some slack to avoid refaults. While memory
#: is contended the headroom shrinks: a guest it leaves short will stall, and its
#: stall claims the memory back (step 1), where headroom given to every guest would
#: starve the one that stalls.
HEADROOM_FRACTION: Final = 0.10
HEADROOM_BYTES: Final = 8 * MIB
CONTENDED_HEADROOM_FRACTION: Final = 0.02
CONTENDED_HEADROOM_BYTES: Final = 4 * MIB
#: A guest stalled on memory for this share of its time is short of memory. At the
#: simulator's costs a miss costs ~120 references, so this is ~0.05 % of references
#: missing: a guest this far past its working set's edge gains from more memory.
STALL_THRESHOLD: Final = 0.05
#: A guest still stalling this much keeps what it uses now (as far as it may), whatever
#: its sampled working set says: sampling misses a skewed working set's rarely touched
#: tail, and shrinking such a guest would only make it stall and grow again. What it
#: uses, not what it may use: a step it got while it stalled and did not fill goes
#: back (suite-2-28: 190 MiB of a step sat unused while another guest stalled).
STALL_KEEP_THRESHOLD: Final = 0.01
#: Where a guest reports faults but no stall time: what one major fault is taken to
#: cost (a 4 KiB read from swap on an SSD, and the write that made room for it).
FAULT_STALL_S: Final = 100e-6
#: A stalled guest asks for this much more than it may hold now, more the more it
#: stalls: small steps for a guest at its working set's edge, big ones for a guest
#: that thrashes (its working set may be far beyond what it holds).
GROW_MIN_FRACTION: Final = 0.10
GROW_MAX_FRACTION: Final = 0.50
#: ...and at least this much, so a small guest squeezed to its kernel gets out quickly.
GROW_MIN_BYTES: Final = 16 * MIB
#: A guest at least this short of its available floor is rescued. Less is what a guest
#: the daemon's pacing held at its floor shows as its use moves a little: rescuing
#: that would swing its balloon back and forth every period (measured on a real
#: guest: 16 MiB each way, 1 MiB short).
RESCUE_SHORT_BYTES: Final = 8 * MIB
#: Inflations smaller than this are not made: taking pages costs the guest work (it
#: may have to write them out), and chasing the working set's sampling noise would
#: move the balloon every period. Deflations are always made: they cost nothing, and
#: a guest asks for more only when it needs it.
DEAD_BAND_FRACTION: Final = 0.02  # of the guest's memory
DEAD_BAND_BYTES: Final = 4 * MIB
#: A guest whose memory in use grew at least this fast in the last interval is
#: growing (less is a real guest's page cache and free count moving a little)...
GROWING_BYTES_PER_S: Final = 1 * MIB
#: ...and keeps, of what it may use now, what it would touch at that rate this long.
RUNWAY_S: Final = 16.0
#: A guest not short (stalled under ``STALL_THRESHOLD``) whose use and working set
#: both grow wants, beyond what it may hold now, what it would touch this long, as
#: far as ``GROW_MIN_BYTES``: the time it would otherwise wait for more once it
#: stalls (a period to show the stall, one to free memory elsewhere, one to hand it
#: over). A scan outgrowing its memory by a page misses every reference meanwhile
#: (suite-5-14: a 118 MiB CLOCK scan ramping up 2 MiB/s thrashed for a second at
#: the edge of what it might hold).
LEAD_S: Final = 3.0
#: The lead is for a guest whose use and working set both grew at least this fast:
#: less than ``GROWING_BYTES_PER_S``, since both must grow (a real guest's page
#: cache moving a little does not grow its sampled set) and a slow grower's lead is
#: only a few seconds of its growth. Suite-8-2: a uniform set ramping up 0.46 MiB/s
#: on a host with room to spare thrashed for a second at the edge of the share it
#: was held to, as the lead's 1 MiB/s would not lead it.
LEAD_BYTES_PER_S: Final = MIB // 4
#: A growing guest reaches past what it may use now, into memory nobody uses, for
#: what it would touch this long: as long as the lead, the time a stall takes to be
#: served. Longer, a scan drifting 121 MiB in one period reached for 1.9 GiB at 16 s
#: of that rate, and its balloon swung 1.2 GiB out and back (suite-1-163, -1.1 %).
REACH_S: Final = LEAD_S


@dataclass(frozen=True)
class _Guests:
    """The snapshot's guests as arrays, in order (bytes unless named otherwise)."""

    memory: I64
    held: I64  # machine memory backing the guest now
    #: What it holds less what it reports free. A QEMU guest "holds" all its balloon
    #: leaves it, however little of that it uses: a guest that grew once and freed
    #: its memory again must not keep its peak as if it used it.
    in_use: I64
    balloon: I64  # pages the balloon holds now
    register: I64  # what the register holds now
    mins: I64
    maxes: I64
    shares: F64
    driver: npt.NDArray[np.bool_]  # has a balloon driver
    ballooned: npt.NDArray[np.bool_]  # has one, and it follows its register

    @classmethod
    def of(cls, guests: Sequence[GuestView], host_capped: frozenset[str] = frozenset()) -> _Guests:
        """``host_capped``: guests the host holds to their allocation by paging them
        (``policy/limitpaging.py``): their balloons are left deflated, as if they had
        none."""

        def ints(values: list[int]) -> I64:
            return np.array(values, dtype=np.int64)

        return cls(
            memory=ints([g.spec.memory_bytes for g in guests]),
            held=ints([g.sample.allocated_bytes for g in guests]),
            in_use=ints([_in_use_bytes(g) for g in guests]),
            balloon=ints([g.sample.balloon_bytes for g in guests]),
            register=ints([g.sample.balloon_target_bytes for g in guests]),
            mins=ints([g.spec.min_bytes for g in guests]),
            maxes=ints([g.spec.limit_bytes for g in guests]),
            shares=np.array([float(g.spec.shares) for g in guests], dtype=np.float64),
            driver=np.array(
                [g.spec.balloon and g.name not in host_capped for g in guests], dtype=np.bool_
            ),
            ballooned=np.array(
                [_balloon_follows(g) and g.name not in host_capped for g in guests],
                dtype=np.bool_,
            ),
        )

    @property
    def allowance(self) -> I64:
        """What each guest may use now: its memory less what its balloon holds."""
        out: I64 = self.memory - self.balloon
        return out


def _balloon_follows(view: GuestView) -> bool:
    """Whether the guest has a balloon driver that follows its register."""
    return view.spec.balloon and view.sample.cooperative


def _in_use_bytes(view: GuestView) -> int:
    """What the guest holds, less the memory it reports free (when it does), and at
    most what the host counts of its RAM (where it does).

    The host's count bounds it for a guest that reports no free figure (our agent
    sends MemAvailable only): a page of guest RAM the host does not hold was never
    touched, or was given back, so it is not in use. Pages KSM merged and pages in
    the host's swap are in use but not counted whole in the guest's RAM, so they are
    added back.
    """
    s = view.sample
    in_use = s.allocated_bytes
    if s.free_bytes is not None:
        allowance = view.spec.memory_bytes - s.balloon_bytes
        in_use = max(0, min(s.allocated_bytes, allowance - s.free_bytes))
    host = s.host
    if host is not None and host.guest_ram_bytes is not None:
        touched = host.guest_ram_bytes + (host.ksm_merged_bytes or 0) + (host.swapped_bytes or 0)
        in_use = min(in_use, touched)
    return in_use


def _stall_figures(view: GuestView) -> tuple[float, float | None] | None:
    """The guest's smoothed stall and its last interval's (None where not known yet):
    its stall time where it reports that, else its major faults at ``FAULT_STALL_S``
    each. None before it has rates."""
    p = view.pressure
    if p is None:
        return None
    if p.stall_fraction is not None:
        return p.stall_fraction, p.stall_fraction_now
    now = p.major_faults_per_s_now
    return (
        min(1.0, p.major_faults_per_s * FAULT_STALL_S),
        None if now is None else min(1.0, now * FAULT_STALL_S),
    )


def stall_fraction(view: GuestView) -> float:
    """How much of its time the guest stalled on memory lately (0 when unknown).

    The smoothed figure, unless the last interval alone was less than half of it: a
    guest that stops stalling (it went idle, or got what it needed) lets go of its
    claim at once instead of while the average decays.
    """
    figures = _stall_figures(view)
    if figures is None:
        return 0.0
    smoothed, now = figures
    return smoothed if now is None else min(smoothed, 2.0 * now)


def interval_stall_fraction(view: GuestView) -> float:
    """How much of its time the guest stalled on memory over the last interval alone,
    where it reports that (else the smoothed figure): a stall that has settled shows
    settled here at once, where the smoothed figure takes a few half-lives."""
    figures = _stall_figures(view)
    if figures is None:
        return 0.0
    smoothed, now = figures
    return smoothed if now is None else now


def recent_working_bytes(guests: Sequence[GuestView]) -> I64:
    """Each guest's recent working set (the fast average alone), or its estimate
    where the scheduler has none."""
    return np.array(
        [
            g.working_set_bytes
            if g.recent_working_set_bytes is None
            else g.recent_working_set_bytes
            for g in guests
        ],
        dtype=np.int64,
    )


def headroom_bytes(working_bytes: I64, *, contended: bool) -> I64:
    """Each working set plus the headroom for the host's state of contention."""
    fraction, extra = (
        (CONTENDED_HEADROOM_FRACTION, CONTENDED_HEADROOM_BYTES)
        if contended
        else (HEADROOM_FRACTION, HEADROOM_BYTES)
    )
    out: I64 = (working_bytes * (1.0 + fraction)).astype(np.int64) + extra
    return out


def demand_bytes(
    guests: Sequence[GuestView],
    stalls: F64 | None = None,
    *,
    in_use: I64 | None = None,
    futile: npt.NDArray[np.bool_] | None = None,
    rescue: bool = True,
) -> I64:
    """Each guest's demand (see the module docstring, step 1), before min and max.
    ``stalls`` and ``in_use``: each guest's :func:`stall_fraction` and
    :func:`_in_use_bytes`, if the caller has them; ``futile``: guests that more memory
    barely helps (``policy/futility.py``), which want what they may hold and do not
    make the others fall back to their recent working set; ``rescue``: whether a guest
    short of available memory now wants it now."""
    if stalls is None:
        stalls = np.array([stall_fraction(g) for g in guests], dtype=np.float64)
    if in_use is None:
        in_use = np.array([_in_use_bytes(g) for g in guests], dtype=np.int64)
    if futile is None:
        futile = np.zeros(len(guests), dtype=np.bool_)
    stalled = stalls >= STALL_THRESHOLD
    contended = bool(stalled.any())
    # Only a guest that more memory helps takes what the others stopped using lately
    # (their recent working set) before their slow average forgets it.
    hurried = bool((stalled & ~futile).any())
    working = (
        recent_working_bytes(guests)
        if hurried
        else np.array([g.working_set_bytes for g in guests], dtype=np.int64)
    )
    memory = np.array([g.spec.memory_bytes for g in guests], dtype=np.int64)
    allowance = memory - np.array([g.sample.balloon_bytes for g in guests], dtype=np.int64)
    demand = headroom_bytes(working, contended=contended)
    grow = np.minimum(GROW_MAX_FRACTION, np.maximum(GROW_MIN_FRACTION, stalls))
    grown = np.maximum(
        np.maximum(demand, (allowance * (1.0 + grow)).astype(np.int64)),
        allowance + GROW_MIN_BYTES,
    )
    kept = np.maximum(demand, np.minimum(in_use, allowance))
    # A quiet guest wants no more than it may use now: were it short, it would
    # stall. Its working set's headroom above that is a guess, and serving the guess
    # first takes pages from a guest that uses them all (suite-1-135: an idle
    # guest's slow average took 40 MiB from one that fit by 3 MiB, every few seconds).
    # A guest without a balloon may use all its memory, so it wants no more than it
    # uses: its headroom held for it sat free while a ballooned guest a few MiB short
    # thrashed (suite-10-56, 10-80); when it grows, it takes the memory itself.
    no_balloon = np.array([not _balloon_follows(g) for g in guests])
    quiet = np.minimum(demand, np.where(no_balloon, np.minimum(in_use, allowance), allowance))
    demand = np.where(
        futile,
        quiet,
        np.where(
            stalls >= STALL_THRESHOLD,
            grown,
            np.where(stalls >= STALL_KEEP_THRESHOLD, kept, quiet),
        ),
    )
    # Rescue: a guest that ran short all at once (its available memory under the
    # floor this period) gets what it lacks and a step now, ahead of the averages it
    # would otherwise wait out while its OOM killer does not; and as much again as
    # it used in the last interval, since a burst still under way goes on while the
    # memory is on its way (a period to free it elsewhere, one to hand it over).
    short_now = np.array(
        [(g.sample.available_short_bytes or 0) if rescue else 0 for g in guests], dtype=np.int64
    )
    fall = np.array([g.sample.available_fall_bytes or 0 for g in guests], dtype=np.int64)
    demand = np.where(
        short_now >= RESCUE_SHORT_BYTES,
        np.maximum(demand, allowance + short_now + fall + GROW_MIN_BYTES),
        demand,
    )
    out: I64 = np.minimum(demand, memory)
    return out


def runway_bytes(demand: I64, guests: _Guests, growth_bytes_per_s: F64) -> I64:
    """Each guest's runway: for a growing guest, what it uses (or demands, if more)
    and what it would touch over the next ``RUNWAY_S`` at the rate its use grew, as
    far as it may use now; for the others, their demand. Served after the stalled
    guests (``allocations_bytes``), it keeps memory a guest was given while it still
    grows into it (``policy/growth.py``), and never hands it more than that."""
    runway = np.maximum(demand, guests.in_use) + (growth_bytes_per_s * RUNWAY_S).astype(np.int64)
    kept = np.maximum(demand, np.minimum(runway, guests.allowance))
    out: I64 = np.where(growth_bytes_per_s >= GROWING_BYTES_PER_S, kept, demand)
    return out


def reach_bytes(guests: _Guests, growth_bytes_per_s: F64) -> I64:
    """Each growing guest's *reach*: what it uses and what it would touch over the
    next ``REACH_S`` at the rate its use grew, at most its memory; 0 for the others.
    Past what the guest may use now, served only from memory nobody holds
    (``allocations_bytes``, after what guests hold and use), so a guest that grows
    faster than one decision a period can follow finds it in its allowance instead
    of at the edge of the share the rest was spread by (suite-10-193: a scan growing
    760 MiB/s was held at 1237 MiB while 1 GiB of the host lay free, and paged
    inside itself for 4 s)."""
    reach = guests.in_use + (growth_bytes_per_s * REACH_S).astype(np.int64)
    out: I64 = np.where(
        growth_bytes_per_s >= GROWING_BYTES_PER_S, np.minimum(reach, guests.memory), 0
    )
    return out


def lead_bytes(guests: _Guests, unstalled: npt.NDArray[np.bool_], use: F64, working: F64) -> I64:
    """Each ``unstalled`` guest's lead, where its use and its recent working set both
    grow (bytes a second) by ``LEAD_BYTES_PER_S`` or more: what it uses and what it
    would touch at the slower rate over ``LEAD_S``, at most ``GROW_MIN_BYTES`` more and
    at most its memory; 0 for the others. Both rates, since a set that drifts touches
    new pages while its size stays (its use grows; suite-8-73: served a lead, a
    drifting uniform set took 125 MiB it did not need from a guest that stalled), and
    a sampled set that dips and recovers did not grow in use. A guest that stalls asks
    for more anyway."""
    rate = np.minimum(use, working)
    ahead = np.minimum((rate * LEAD_S).astype(np.int64), GROW_MIN_BYTES)
    lead = np.minimum(guests.in_use + ahead, guests.memory)
    out: I64 = np.where(unstalled & (rate >= LEAD_BYTES_PER_S), lead, 0)
    return out


def water_fill(shares: F64, floors: I64, caps: I64, available_bytes: int) -> I64:
    """Give each guest ``floors`` and then more, up to ``caps``, at a common level of
    memory per share, until ``available_bytes`` is handed out (whole pages)."""
    caps = np.maximum(caps, floors)
    return equilibrium_bytes(
        shares,
        np.zeros(len(shares), dtype=np.float64),
        floors,
        caps,
        available_bytes=available_bytes,
        tax_rate=0.0,
    )


def allocations_bytes(
    guests: _Guests,
    demand: I64,
    short: npt.NDArray[np.bool_],
    runway: I64,
    used: I64,
    available_bytes: int,
    reach: I64 | None = None,
) -> I64:
    """Step 2 of the module docstring: demand by shares; then, for guests ``short`` of
    memory (stalled), whatever more they may take, by shares; then growing guests'
    ``runway``; then what guests hold, as far as they used it lately (``used``); then
    growing guests' ``reach`` (:func:`reach_bytes`); then the rest by shares."""
    wanted = np.clip(demand, guests.mins, guests.maxes)
    met = water_fill(guests.shares, guests.mins, wanted, available_bytes)
    if reach is None:
        reach = np.zeros_like(demand)
    for caps in (
        np.where(short, guests.maxes, met),
        np.clip(runway, met, guests.maxes),
        np.clip(np.minimum(guests.held, used), met, guests.maxes),
        np.clip(reach, met, guests.maxes),
        guests.maxes,
    ):
        if int(met.sum()) + PAGE_SIZE_BYTES >= available_bytes:
            break
        met = water_fill(guests.shares, met, caps, available_bytes)
    return met


def free_now_bytes(host: HostSample) -> int:
    """Memory free now for a growing guest to deflate into: by the balloons' sizes, or
    by the host's own count where the backend reads it and it finds more (guests hold
    less than their balloons allow: pages never touched, or given back by free page
    reporting or merged by KSM). That memory is free now; the others' balloons still
    inflate to their allocations, so it stays free."""
    if host.truth is None:
        return host.free_bytes
    return max(host.free_bytes, host.truth.free_bytes)


def registers_bytes(
    guests: _Guests,
    allocations: I64,
    host_free_bytes: int,
    margin: int,
    available_bytes: int,
) -> I64:
    """Step 3: the balloon register of each guest for its allocation."""
    allowance = guests.allowance
    registers = guests.memory - allocations
    # A growing guest deflates only into memory free now (less the margin), shared
    # among the growing guests in proportion to what each still lacks.
    lacking = np.where(guests.ballooned, np.maximum(allocations - allowance, 0), 0)
    total = int(lacking.sum())
    room = max(0, host_free_bytes - margin)
    if total > room:
        granted = (lacking * (room / total)).astype(np.int64) // PAGE_SIZE_BYTES * PAGE_SIZE_BYTES
        registers = np.where(lacking > 0, guests.memory - (allowance + granted), registers)
    dead_band = np.maximum((guests.memory * DEAD_BAND_FRACTION).astype(np.int64), DEAD_BAND_BYTES)
    keep = (registers > guests.register) & (registers - guests.register < dead_band)
    if total > room:
        keep[:] = False  # a guest waits for free memory: every inflation counts
    kept = np.where(keep, guests.register, registers)
    # A register left alone must not break the partition. A guest without a balloon
    # the policy moves (none, or the host holds it) counts for what it may grow into.
    others = np.maximum(guests.held, allocations)
    if int(np.where(guests.driver, guests.memory - kept, others).sum()) > available_bytes:
        kept = registers
    # The reservation and the limit hold always, whatever the growth rule or the
    # dead band kept.
    kept = np.clip(kept, guests.memory - guests.maxes, guests.memory - guests.mins)
    out: I64 = np.where(guests.driver, kept, 0)
    return out


def defer_squeezes(guests: _Guests, allocations: I64, wanted: I64) -> I64:
    """Allocations that take from the guests' pages in use only what is needed now.

    An allocation below what a guest holds means its balloon must take pages it uses:
    the guest writes them out, and pays again if it needed them after all (a working
    set's rarely touched tail is what sampling misses). Where other guests were handed
    more than they hold or want (the last pass's spread of the rest by shares), that
    surplus is taken back instead, as far as it goes: the guests above their
    allocation keep what they hold until someone wants the memory. The allocations
    still add up to no more than before, so the partition holds.

    Only pages *in use* are spared (``_Guests.in_use``): pages the guest reports free
    cost nothing to take.
    """
    ballooned = guests.ballooned
    held = np.minimum(guests.in_use, guests.maxes)  # never kept beyond the limit
    squeeze = np.where(ballooned, np.maximum(held - allocations, 0), 0)
    surplus = np.where(ballooned, np.maximum(allocations - np.maximum(guests.held, wanted), 0), 0)
    total_squeeze, total_surplus = int(squeeze.sum()), int(surplus.sum())
    deferred = min(total_squeeze, total_surplus)
    if deferred <= 0:
        return allocations
    kept = squeeze * (deferred / total_squeeze) // PAGE_SIZE_BYTES * PAGE_SIZE_BYTES
    given = -(-surplus * (deferred / total_surplus) // PAGE_SIZE_BYTES) * PAGE_SIZE_BYTES
    out: I64 = allocations + kept.astype(np.int64) - given.astype(np.int64)
    return out


class DemandPolicy:
    """Demand met by shares, idle memory reclaimed first, the host partitioned by
    balloons (see the module docstring)."""

    def __init__(
        self,
        tax_rate: float = DEFAULT_TAX_RATE,
        margin_fraction: float = DEFAULT_MARGIN_FRACTION,
        *,
        rescue: bool = True,
    ) -> None:
        """``rescue``: off, a guest that runs short waits for its averages (for
        measuring what the rescue buys)."""
        if not 0.0 <= margin_fraction < 1.0:
            raise ValueError(f"margin fraction must be in [0, 1), got {margin_fraction}")
        # The tax applies to processors (cpu_targets); memory is taxed fully (above).
        self.tax_rate = tax_rate
        self.margin_fraction = margin_fraction
        self.rescue = rescue
        self._load = LoadControl()
        self._limits = LimitPaging()
        self._growth = UseGrowth()
        self._set_growth = UseGrowth()  # of the recent working set
        self._futility = Futility()
        self._allotted: dict[str, int] = {}

    @property
    def name(self) -> str:
        return "demand"

    def _growth_bytes_per_s(self, snapshot: Snapshot, names: list[str], guests: _Guests) -> F64:
        """Each guest's growth in use: as the guest's reports measure it, where they
        do (a real guest's, net of its balloon's moves); else as this policy sees its
        use change between decisions (the simulator's guests, whose figures are
        always current)."""
        seen = self._growth.update(snapshot.time_s, names, guests.in_use)
        reported = [g.sample.use_growth_bytes_per_s for g in snapshot.guests]
        return np.array(
            [s if r is None else r for s, r in zip(seen.tolist(), reported, strict=True)],
            dtype=np.float64,
        )

    def decide(self, snapshot: Snapshot) -> Decision:
        check_reservations(snapshot)
        views = snapshot.guests
        if not views:
            return Decision(())
        host = snapshot.host
        margin = int(host.memory_bytes * self.margin_fraction)
        available = host.memory_bytes - margin
        names = [g.name for g in views]
        stalls = np.array([stall_fraction(g) for g in views], dtype=np.float64)
        stall_list = stalls.tolist()  # what the stateful rules take
        interval_stalls = [interval_stall_fraction(g) for g in views]
        ceilings = [
            min(g.spec.limit_bytes, self._allotted.get(g.name, g.spec.limit_bytes)) for g in views
        ]
        capped = self._limits.update(snapshot.time_s, views, stall_list, interval_stalls, ceilings)
        guests = _Guests.of(views, capped)
        futile_names = self._futility.update(snapshot.time_s, views, stall_list)
        futile = np.array([n in futile_names for n in names], dtype=np.bool_)
        short = (stalls >= STALL_THRESHOLD) & ~futile
        working = np.array([g.working_set_bytes for g in views], dtype=np.int64)
        used = headroom_bytes(working, contended=False)
        demand = demand_bytes(
            views, stalls, in_use=guests.in_use, futile=futile, rescue=self.rescue
        )
        growth = self._growth_bytes_per_s(snapshot, names, guests)
        set_growth = self._set_growth.update(snapshot.time_s, names, recent_working_bytes(views))
        unstalled = (stalls < STALL_THRESHOLD) & ~futile
        demand = np.maximum(demand, lead_bytes(guests, unstalled, growth, set_growth))
        runway = runway_bytes(demand, guests, growth)
        reach = reach_bytes(guests, growth)
        turns = self._load.update(snapshot.time_s, views, stall_list, available)
        if turns.holder is not None:
            # Load control: the holder may grow to its limit; the others of the
            # thrashing group fall back to their reservations, keeping only what no
            # other guest wants (defer_squeezes, below).
            held_back = np.array([n in turns.held_back for n in names], dtype=np.bool_)
            holder = np.array([n == turns.holder for n in names], dtype=np.bool_)
            # A holder that stalls may grow to its limit; one that has stopped
            # stalling wants what it uses, and the rest goes to the others by shares.
            growing = holder & (stalls >= STALL_KEEP_THRESHOLD)
            demand = np.where(held_back, 0, np.where(growing, guests.memory, demand))
            used = np.where(held_back, 0, used)
            runway = np.where(held_back, 0, np.maximum(runway, demand))
            reach = np.where(held_back, 0, reach)
            short = (short | growing) & ~held_back
        allocations = allocations_bytes(guests, demand, short, runway, used, available, reach)
        # A stalled guest wants all it is given: its demand was only a step.
        wanted = np.where(short, guests.maxes, np.clip(runway, guests.mins, guests.maxes))
        allocations = defer_squeezes(guests, allocations, wanted)
        registers = registers_bytes(guests, allocations, free_now_bytes(host), margin, available)
        self._allotted = dict(zip(names, allocations.tolist(), strict=True))
        mechanisms = self._mechanisms(host.state, guests)
        cpus = cpu_targets(snapshot, self.tax_rate)
        targets = tuple(
            GuestTarget(name, alloc, register, cpus.get(name), host_capped=name in capped)
            for name, alloc, register in zip(
                names, allocations.tolist(), registers.tolist(), strict=True
            )
        )
        return Decision(targets, mechanisms)

    @staticmethod
    def _mechanisms(state: HostState, guests: _Guests) -> Mechanisms:
        uncooperative = not bool(guests.ballooned.all())
        return Mechanisms(
            balloon=True,
            host_paging=uncooperative and state.rank >= HostState.HARD.rank,
            block_over_target=state is HostState.LOW,
            host_paging_ballooned=False,
        )
