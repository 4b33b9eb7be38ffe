"""The simulator's compiled core: one guest OS, its VMM mapping, and its workload.

Everything per page lives in flat numpy arrays (no Python object per page) and the
hot loops are numba-compiled. Per guest, with P guest-physical frames and V virtual
pages of the workload:

    v2p[V]      frame holding each virtual page, or -1 (not resident)
    vswap[V]    1 if the virtual page's contents are in the guest's swap
    p2v[P]      virtual page in each frame, or FREE / BALLOON / KERNEL
    pstate[P]   the VMM's physical-to-machine map: UNBACKED / MAPPED / HOST_SWAPPED
    stamp[P]    the guest's resident order (LRU: when last used, FIFO: when it
                arrived), a count that only grows; 0 for a frame not in the order
    oldest[K]   the victim queue: the K frames with the smallest stamps, oldest first
                (LRU and FIFO; CLOCK guests carry empty arrays for both)
    refbit[P]   CLOCK reference bits
    sampled[P]  working-set sampling marks (SAMPLED, then TOUCHED once referenced)
    free[P]     the guest's free-frame stack
    freed_at[P] when each frame last went free still backed (free page reporting
                guests only; an empty array for the others)

The guest OS picks its own victims (LRU / CLOCK / FIFO) and swaps to its own swap.
The VMM only sees frames: it backs a frame with machine memory on first touch, takes
the machine page away when the balloon pins the frame, and, when the host must page,
picks victims at random without any knowledge of the guest. A guest that then evicts
a frame the host already swapped out forces the host to read it back only so the
guest can write it out: a double-paging event.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from balloonist.sim.prefetch import prefetch

# p2v special values
FREE = -1
BALLOON = -2
KERNEL = -3

# pstate values
UNBACKED = 0
MAPPED = 1
HOST_SWAPPED = 2

# sampled values
SAMPLED = 1
TOUCHED = 2

# replacement codes (match scenario.Replacement)
LRU = 0
CLOCK = 1
FIFO = 2

# workload codes (match workload.WorkloadKind)
IDLE = 0
UNIFORM = 1
ZIPF = 2
SCAN = 3

# Indices into a guest's int64 scalar array ``st``.
S_NFREE = 0
S_STAMP = 1  # the stamp the next used (LRU) or arriving (FIFO) frame gets; from 1
S_OLD_POS = 2  # the victim queue's next entry
S_HAND = 3  # CLOCK hand
S_MAPPED = 4  # frames backed by machine memory
S_HOST_SWAPPED = 5  # frames whose contents the host paged out
S_SWAP_USED = 6  # guest swap slots in use
S_RESIDENT = 7  # workload pages resident in frames
S_BALLOON = 8  # frames pinned by the balloon
S_SCAN_POS = 9
S_REFS = 10
S_MAJOR = 11  # faults served from guest swap
S_MINOR = 12  # first-touch faults (zero fill)
S_GUEST_SWAP_OUT = 13
S_HOST_SWAP_IN = 14
S_HOST_SWAP_OUT = 15
S_DOUBLE_PAGING = 16
S_HOST_ALLOC = 17
S_STALLS = 18  # slices cut short: no machine page or no guest swap could be had
S_STALLED_NS = 19  # the time those slices lost, waiting for memory (nanoseconds)
S_REPORTED = 20  # machine pages returned to the host by free page reporting
S_OLD_LEN = 21  # entries in the victim queue
S_OLD_AT = 22  # the stamp count when the queue was filled
S_HOST_RECLAIM = 23  # host page-outs made in the guest's own faults: it waited for them
N_SCALARS = 24

# Indices into the cost array (seconds).
C_REF = 0
C_MINOR = 1
C_SWAP_IN = 2
C_SWAP_OUT = 3
C_HOST_ALLOC = 4
C_HOST_SWAP_IN = 5
C_HOST_SWAP_OUT = 6
C_BALLOON_PAGE = 7
C_PAGE_REPORT = 8
N_COSTS = 9

# Indices into the host's shared int64 array.
H_SWAP_FREE = 0  # host swap slots free
H_FREE = 1  # machine pages backing no guest page
N_HOST = 2

# The fault-path helpers below are compiled without numba's reference counting
# (_nrt=False): they allocate nothing, and otherwise every call increments and
# decrements each array argument's count atomically on entry and exit, which cost
# more than the helper's own work on every page fault.

_NO_REFCOUNTS: dict[str, Any] = {"_nrt": False}  # numba's flag, missing from its stubs

# Host-side random victim search: random probes first (cheap while most frames are
# mapped), then a linear sweep so the search always terminates.
_VICTIM_PROBES = 64


@njit(cache=True, inline="always")
def _step(x: np.uint64) -> np.uint64:
    """One step of xorshift64*: fast, good enough for reference streams, and
    per-guest reproducible. The reference loop keeps the state in a local; the other
    kernels keep it in ``rng[0]``."""
    x ^= x >> np.uint64(12)
    x ^= x << np.uint64(25)
    x ^= x >> np.uint64(27)
    return x


@njit(cache=True, inline="always")
def _unit(x: np.uint64) -> float:
    """The draw in [0, 1) from state ``x``: the generator's output, top 53 bits."""
    return ((x * np.uint64(0x2545F4914F6CDD1D)) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=True, inline="always")
def _rand_unit(rng: np.ndarray) -> float:
    x = _step(rng[0])
    rng[0] = x
    return _unit(x)


@njit(cache=True, inline="always")
def _rand_below(rng: np.ndarray, n: int) -> int:
    # unbiased enough for n << 2**53
    return int(_rand_unit(rng) * n)


# --------------------------------------------------------------------------------------
# The guest's resident order (LRU and FIFO). A frame's stamp says when it was last used
# (LRU) or arrived (FIFO); the victim is the frame with the smallest stamp. A hit
# writes one stamp, where a linked list would touch the frame and both neighbours (three
# cache misses on a large guest). The victim queue holds the oldest frames, sorted, as
# stamped when it was filled: an entry whose frame has since been used again, evicted
# or refilled carries a newer stamp (or none), and is skipped. Every frame not in the
# queue was newer than all of it when it was filled, so the first entry still valid is
# the oldest frame of all: the same victim a recency list's tail gives.


def order_arrays(frames: int, policy: int) -> tuple[np.ndarray, np.ndarray]:
    """A new guest's (stamp, oldest) arrays: a queue of up to a quarter of its frames,
    so a refill (three passes over all frames) comes at most every ``frames / 4``
    victims."""
    if policy == CLOCK:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
    return np.zeros(frames, dtype=np.int64), np.zeros(max(1, frames // 4), dtype=np.int32)


@njit(cache=True)
def _refill_oldest(st, stamp, oldest):  # type: ignore[no-untyped-def]
    """Fill the victim queue with the oldest frames in the order, oldest first.

    The stamps in use are bucketed by age, one bucket more than the queue has entries,
    and the oldest whole buckets that fit go in (where the oldest bucket alone would
    not fit, it is bucketed again, finer): every frame left out is newer than all
    taken. A counting pass places the frames bucket by bucket, and each bucket, a
    few frames on average, is sorted by stamp. Three passes over the stamps, where a
    heap of the oldest cost a sift per frame through the frames' stamps, on every
    victim a thrashing guest took.
    """
    cap = oldest.shape[0]
    count = 0
    lo = 0
    hi = 0
    for f in range(stamp.shape[0]):
        s = stamp[f]
        if s > 0:
            lo = s if count == 0 or s < lo else lo
            hi = max(hi, s)
            count += 1
    taken = 0
    if count > 0:
        # one bucket more than entries: at least two, so the oldest bucket is a part
        # of the range and looking inside it narrows the range
        nbuckets = cap + 1
        hist = np.zeros(nbuckets, dtype=np.int64)
        while True:
            width = (hi - lo) // nbuckets + 1
            hist[:] = 0
            for f in range(stamp.shape[0]):
                s = stamp[f]
                if s >= lo and s <= hi:
                    hist[(s - lo) // width] += 1
            buckets = 0
            taken = 0
            while buckets < nbuckets and taken + hist[buckets] <= cap:
                taken += hist[buckets]
                buckets += 1
            if buckets > 0:
                break
            hi = lo + width - 1  # stamps are distinct: at width 1 a bucket holds one
        start = np.zeros(buckets + 1, dtype=np.int64)
        start[1:] = np.cumsum(hist[:buckets])
        fill = start[:-1].copy()
        for f in range(stamp.shape[0]):
            s = stamp[f]
            if s >= lo and s <= hi:
                b = (s - lo) // width
                if b < buckets:
                    oldest[fill[b]] = f
                    fill[b] += 1
        for b in range(buckets):
            _sort_by_stamp(oldest, stamp, start[b], start[b + 1])
    st[S_OLD_POS] = 0
    st[S_OLD_LEN] = taken
    st[S_OLD_AT] = st[S_STAMP]


@njit(cache=True)
def _sort_by_stamp(frames, stamp, a, z):  # type: ignore[no-untyped-def]
    """Sort ``frames[a:z]`` by their stamps: insertion for a few, else argsort."""
    if z - a <= 16:
        for i in range(a + 1, z):
            f = frames[i]
            key = stamp[f]
            j = i - 1
            while j >= a and stamp[frames[j]] > key:
                frames[j + 1] = frames[j]
                j -= 1
            frames[j + 1] = f
        return
    segment = frames[a:z].copy()
    order = np.argsort(stamp[segment])
    for i in range(z - a):
        frames[a + i] = segment[order[i]]


@njit(cache=True, inline="always")
def _order_oldest(st, stamp, oldest):  # type: ignore[no-untyped-def]
    """The frame with the smallest stamp, or -1 if the order is empty. It stays in
    the order: the caller evicts it (or, failing, gets it again next time)."""
    for _ in range(2):
        at = st[S_OLD_AT]
        n = st[S_OLD_LEN]
        pos = st[S_OLD_POS]
        while pos < n:
            f = oldest[pos]
            s = stamp[f]
            if s > 0 and s < at:
                st[S_OLD_POS] = pos
                return f
            pos += 1
        _refill_oldest(st, stamp, oldest)
    return -1


@njit(cache=True, inline="always")
def _pick_guest_victim(st, p2v, stamp, oldest, refbit, policy):  # type: ignore[no-untyped-def]
    """The guest OS's own replacement choice among resident workload frames, or -1."""
    if st[S_RESIDENT] == 0:
        return -1
    if policy == CLOCK:
        nframes = p2v.shape[0]
        hand = st[S_HAND]
        # two sweeps always suffice: the first clears every reference bit
        for _ in range(2 * nframes + 1):
            f = hand
            hand += 1
            if hand == nframes:
                hand = 0
            if p2v[f] < 0:
                continue
            if refbit[f]:
                refbit[f] = 0
                continue
            st[S_HAND] = hand
            return f
        return -1
    return _order_oldest(st, stamp, oldest)


@njit(cache=True, **_NO_REFCOUNTS)
def _host_victim(st, p2v, pstate, rng, exclude):  # type: ignore[no-untyped-def]
    """A random machine-backed frame of this guest (the host knows nothing better)."""
    nframes = pstate.shape[0]
    if st[S_MAPPED] <= 0:
        return -1
    for _ in range(_VICTIM_PROBES):
        f = _rand_below(rng, nframes)
        if pstate[f] == MAPPED and f != exclude:
            return f
    start = _rand_below(rng, nframes)
    for i in range(nframes):
        f = start + i
        if f >= nframes:
            f -= nframes
        if pstate[f] == MAPPED and f != exclude:
            return f
    return -1


@njit(cache=True, **_NO_REFCOUNTS)
def _host_page_out(st, p2v, pstate, rng, host, exclude):  # type: ignore[no-untyped-def]
    """Host pages out one random frame of the guest. Returns False if it cannot."""
    if host[H_SWAP_FREE] <= 0:
        return False
    f = _host_victim(st, p2v, pstate, rng, exclude)
    if f < 0:
        return False
    pstate[f] = HOST_SWAPPED
    st[S_MAPPED] -= 1
    st[S_HOST_SWAPPED] += 1
    st[S_HOST_SWAP_OUT] += 1
    host[H_SWAP_FREE] -= 1
    host[H_FREE] += 1
    return True


@njit(cache=True, **_NO_REFCOUNTS)
def _back_frame(f, st, p2v, pstate, rng, host, lim, costs):  # type: ignore[no-untyped-def]
    """Make sure frame ``f`` has machine memory behind it; return the cost, or -1.0 if the
    host could neither grant a machine page nor page another out to make room.

    ``lim`` = (cap, min, reserve, pageable): the guest may hold at most ``cap`` machine
    pages, and may take from the host's free pool only beyond the ``reserve`` kept for
    other guests still below their reservations, unless it is below its own ``min``.
    With no page to grant, the host pages out one of the guest's own if ``pageable``;
    otherwise the guest waits (a host that never swaps a guest its balloon serves).
    """
    state = pstate[f]
    if state == MAPPED:
        return 0.0
    cost = 0.0
    mapped = st[S_MAPPED]
    available = host[H_FREE] if mapped < lim[1] else host[H_FREE] - lim[2]
    if mapped >= lim[0] or available <= 0:
        # No machine page to grant: the host pages out one of this guest's own.
        if lim[3] == 0 or not _host_page_out(st, p2v, pstate, rng, host, f):
            return -1.0
        st[S_HOST_RECLAIM] += 1
        cost += costs[C_HOST_SWAP_OUT]
    if state == HOST_SWAPPED:
        st[S_HOST_SWAPPED] -= 1
        st[S_HOST_SWAP_IN] += 1
        host[H_SWAP_FREE] += 1
        cost += costs[C_HOST_SWAP_IN]
    else:
        st[S_HOST_ALLOC] += 1
        cost += costs[C_HOST_ALLOC]
    pstate[f] = MAPPED
    st[S_MAPPED] += 1
    host[H_FREE] -= 1
    return cost


@njit(cache=True, **_NO_REFCOUNTS)
def _evict(f, st, v2p, vswap, p2v, pstate, stamp, policy, rng, host, lim, swap_pages, costs):  # type: ignore[no-untyped-def]
    """The guest swaps out the workload page in frame ``f``; return cost or -1.0."""
    v = p2v[f]
    cost = 0.0
    if vswap[v] == 0:
        if st[S_SWAP_USED] >= swap_pages:
            return -1.0
        st[S_SWAP_USED] += 1
        vswap[v] = 1
    if pstate[f] == HOST_SWAPPED:
        # The guest must write out a page the host already wrote out: double paging.
        st[S_DOUBLE_PAGING] += 1
        c = _back_frame(f, st, p2v, pstate, rng, host, lim, costs)
        if c < 0.0:
            return -1.0
        cost += c
    if policy != CLOCK:
        stamp[f] = 0
    v2p[v] = -1
    p2v[f] = FREE
    st[S_RESIDENT] -= 1
    st[S_GUEST_SWAP_OUT] += 1
    cost += costs[C_SWAP_OUT]
    return cost


@njit(cache=True, inline="always")
def _stalled(st, used, budget_s):  # type: ignore[no-untyped-def]
    """End a slice the guest cannot go on with; what it lost counts as waiting."""
    st[S_STALLS] += 1
    if budget_s > used:
        st[S_STALLED_NS] += int((budget_s - used) * 1e9)
    return max(used, budget_s)


@njit(cache=True, inline="always")
def _rank(x1, kind, ws_pages, ws_active, alias):  # type: ignore[no-untyped-def]
    """The rank a reference draws, given the state after its first step: a uniform
    reference takes one step, a zipf one a second (the alias coin)."""
    if kind == UNIFORM:
        return int(_unit(x1) * ws_active)
    i = int(_unit(x1) * ws_pages)
    # both outcomes read, then one picked: a select rather than a branch the
    # processor would mispredict on every other draw
    other = int(alias[i, 1])
    r = i if _unit(_step(x1)) < alias[i, 0] else other
    if r >= ws_active:
        r = r % ws_active
    return r


@njit(cache=True, inline="always")
def _after(x1, kind):  # type: ignore[no-untyped-def]
    """The random state after a reference's draws, given the state after its first."""
    return x1 if kind == UNIFORM else _step(x1)


@njit(cache=True, inline="always")
def _draw(x, kind, ws_pages, ws_active, alias):  # type: ignore[no-untyped-def]
    """The next reference's rank in a uniform or zipf working set, and the random
    state after the draws it took."""
    x1 = _step(x)
    return _after(x1, kind), _rank(x1, kind, ws_pages, ws_active, alias)


# --------------------------------------------------------------------------------------
# The reference stream, drawn ahead. On a working set too large for the caches each
# reference waits on three misses in a row (its alias row, its v2p entry, its frame's
# state), so the loop draws references ahead of use and prefetches each line a few
# references before it is needed. The stream is the same as ``_draw`` gives, reference
# for reference; only the order of the loads changes.

_AHEAD_ALIAS = 16  # references ahead: draw the rank's slot, fetch its alias row
_AHEAD_PAGE = 8  # resolve the rank, fetch its v2p entry
_AHEAD_FRAME = 4  # read the frame it maps to, fetch that frame's state
_RING = 32  # slots in flight, > _AHEAD_ALIAS; a power of two
_RING_MASK = _RING - 1
#: Below this many pages in use the working set's lines stay in cache and drawing
#: ahead costs more than it saves (measured on the suite's hosts).
DRAW_AHEAD_MIN_PAGES = 65536


@njit(cache=True, inline="always")
def _ahead_draw(slot, x, kind, ws_pages, alias, ring_x1):  # type: ignore[no-untyped-def]
    """Take the first draw of the reference in ``slot`` from state ``x``; return the
    state the next reference starts from."""
    x1 = _step(x)
    ring_x1[slot & _RING_MASK] = x1
    if kind != UNIFORM:
        prefetch(alias, int(_unit(x1) * ws_pages))
    return _after(x1, kind)


@njit(cache=True, inline="always")
def _ahead_resolve(slot, kind, ws_pages, ws_active, offset, alias, v2p, ring_x1, ring_r):  # type: ignore[no-untyped-def]
    """Finish the draw of the reference in ``slot`` (as ``_draw``) and fetch its page."""
    r = _rank(ring_x1[slot & _RING_MASK], kind, ws_pages, ws_active, alias)
    ring_r[slot & _RING_MASK] = r
    prefetch(v2p, offset + r)


@njit(cache=True)
def _ahead_fill(x, kind, ws_pages, ws_active, offset, alias, v2p, ring_x1, ring_r):  # type: ignore[no-untyped-def]
    """Start the pipeline from state ``x`` at slot 0; return the drawing state."""
    for slot in range(_AHEAD_ALIAS):
        x = _ahead_draw(slot, x, kind, ws_pages, alias, ring_x1)
    for slot in range(_AHEAD_PAGE):
        _ahead_resolve(slot, kind, ws_pages, ws_active, offset, alias, v2p, ring_x1, ring_r)
    return x


@njit(cache=True)
def run_guest(  # type: ignore[no-untyped-def]  # noqa: PLR0912, PLR0915 (a numba kernel: one flat loop)
    budget_s,
    lim,
    st,
    v2p,
    vswap,
    p2v,
    pstate,
    stamp,
    oldest,
    refbit,
    sampled,
    free,
    rng,
    host,
    costs,
    policy,
    swap_pages,
    kind,
    ws_pages,
    ws_active,
    offset,
    alias,
    ahead_min_pages,
):
    """Run the workload for up to ``budget_s`` simulated seconds; return seconds used.

    ``ws_active`` <= ``ws_pages`` is how much of the working set is in use yet (a
    working set that ramps up); zipf ranks beyond it fold back onto it. ``alias`` is
    the zipf alias table, one (probability, alias rank) row per rank.

    ``lim`` is (cap, min, reserve) as for ``_back_frame``. The run
    ends early (returning at least the budget) when the guest stalls: it needs a
    machine page the host cannot provide, or a swap slot it does not have.

    The random state, the reference count, the scan position and the stamp count
    live in locals while the loop runs: numba cannot tell ``st`` and ``rng`` apart
    from the other arrays, so in memory each would be reloaded after every store on
    the hit path. They go back to ``st`` and ``rng`` before a helper that reads them
    (the fault path) and on the way out.

    With ``ws_active`` >= ``ahead_min_pages`` (and not a scan) references are drawn
    ahead (the ``_ahead_`` helpers): the same references, fetched earlier. The host's
    victim search draws from the same random state, so after a fault path that drew,
    the references drawn ahead are stale and the pipeline starts again.
    """
    if kind == IDLE or ws_active <= 0:
        return budget_s
    used = 0.0
    ref_cost = costs[C_REF]
    x = rng[0]
    refs = 0
    scan_pos = st[S_SCAN_POS]
    now = st[S_STAMP]  # the resident order's count
    stalled = False
    ahead = kind != SCAN and ws_active >= ahead_min_pages
    ring_x1 = np.empty(_RING if ahead else 0, dtype=np.uint64)
    ring_r = np.empty(_RING if ahead else 0, dtype=np.int64)
    k = 0  # the next slot to take
    xa = x  # the state the next slot drawn ahead starts from
    if ahead:
        xa = _ahead_fill(x, kind, ws_pages, ws_active, offset, alias, v2p, ring_x1, ring_r)
    while used < budget_s:
        # which virtual page
        if kind == SCAN:
            r = scan_pos
            if r >= ws_active:
                r = 0
            scan_pos = r + 1 if r + 1 < ws_active else 0
        elif ahead:
            xa = _ahead_draw(k + _AHEAD_ALIAS, xa, kind, ws_pages, alias, ring_x1)
            _ahead_resolve(
                k + _AHEAD_PAGE, kind, ws_pages, ws_active, offset, alias, v2p, ring_x1, ring_r
            )
            fa = v2p[offset + ring_r[(k + _AHEAD_FRAME) & _RING_MASK]]
            if fa >= 0:
                prefetch(pstate, fa)
                prefetch(sampled, fa)
                if policy == LRU:
                    prefetch(stamp, fa)
                elif policy == CLOCK:
                    prefetch(refbit, fa)
            x = _after(ring_x1[k & _RING_MASK], kind)
            r = ring_r[k & _RING_MASK]
            k += 1
        else:
            x, r = _draw(x, kind, ws_pages, ws_active, alias)
        v = offset + r
        f = v2p[v]
        cost = ref_cost
        if f >= 0:
            if pstate[f] != MAPPED:
                rng[0] = x
                c = _back_frame(f, st, p2v, pstate, rng, host, lim, costs)
                if c < 0.0:
                    stalled = True
                    x = rng[0]
                    break
                if ahead and rng[0] != x:
                    k = 0
                    xa = _ahead_fill(
                        rng[0], kind, ws_pages, ws_active, offset, alias, v2p, ring_x1, ring_r
                    )
                x = rng[0]
                cost += c
            if policy == LRU:
                stamp[f] = now
                now += 1
            elif policy == CLOCK:
                refbit[f] = 1
        else:
            # guest page fault: a free frame, or one the guest's own policy evicts
            rng[0] = x
            st[S_STAMP] = now
            if st[S_NFREE] > 0:
                st[S_NFREE] -= 1
                f = free[st[S_NFREE]]
            else:
                f = _pick_guest_victim(st, p2v, stamp, oldest, refbit, policy)
                if f < 0:
                    stalled = True
                    x = rng[0]
                    break
                c = _evict(
                    f, st, v2p, vswap, p2v, pstate, stamp, policy, rng, host, lim,
                    swap_pages, costs,
                )  # fmt: skip
                if c < 0.0:
                    stalled = True
                    x = rng[0]
                    break
                cost += c
            c = _back_frame(f, st, p2v, pstate, rng, host, lim, costs)
            if c < 0.0:
                # give the frame back; the reference did not happen
                free[st[S_NFREE]] = f
                st[S_NFREE] += 1
                stalled = True
                x = rng[0]
                break
            if ahead and rng[0] != x:
                k = 0
                xa = _ahead_fill(
                    rng[0], kind, ws_pages, ws_active, offset, alias, v2p, ring_x1, ring_r
                )
            x = rng[0]
            cost += c
            if vswap[v]:
                vswap[v] = 0
                st[S_SWAP_USED] -= 1
                st[S_MAJOR] += 1
                cost += costs[C_SWAP_IN]
            else:
                st[S_MINOR] += 1
                cost += costs[C_MINOR]
            p2v[f] = v
            v2p[v] = f
            st[S_RESIDENT] += 1
            if policy == CLOCK:
                refbit[f] = 1
            else:
                stamp[f] = now
                now += 1
        if sampled[f] == SAMPLED:
            sampled[f] = TOUCHED
        refs += 1
        used += cost
    rng[0] = x
    st[S_REFS] += refs
    st[S_SCAN_POS] = scan_pos
    st[S_STAMP] = now
    if stalled:
        return _stalled(st, used, budget_s)
    return used


@njit(cache=True)
def balloon_allocate(  # type: ignore[no-untyped-def]
    want,
    reclaim_budget_s,
    out,
    st,
    v2p,
    vswap,
    p2v,
    pstate,
    stamp,
    oldest,
    policy,
    rng,
    host,
    lim,
    swap_pages,
    costs,
    free,
    refbit,
):
    """The guest OS serves a balloon allocation of ``want`` frames and pins them.

    Free frames go first; then the guest reclaims with its own replacement policy,
    spending at most ``reclaim_budget_s`` on swapping (like Linux's __GFP_NORETRY:
    a balloon allocation fails rather than stall the guest). Writes the frames into
    ``out`` and returns (count, seconds spent).
    """
    got = 0
    spent = 0.0
    while got < want:
        if st[S_NFREE] > 0:
            st[S_NFREE] -= 1
            f = free[st[S_NFREE]]
        else:
            if spent >= reclaim_budget_s:
                break
            f = _pick_guest_victim(st, p2v, stamp, oldest, refbit, policy)
            if f < 0:
                break
            c = _evict(
                f, st, v2p, vswap, p2v, pstate, stamp, policy, rng, host, lim, swap_pages, costs
            )
            if c < 0.0:
                break
            spent += c
        p2v[f] = BALLOON
        st[S_BALLOON] += 1
        spent += costs[C_BALLOON_PAGE]
        out[got] = f
        got += 1
    return got, spent


@njit(cache=True)
def vmm_reclaim(frames, st, p2v, pstate, host):  # type: ignore[no-untyped-def]
    """The VMM drops the machine memory behind frames the balloon reported locked.

    Returns the number of machine pages freed, or -1 if any frame is out of range or
    not actually pinned by the balloon (the report is then refused as a whole).
    """
    nframes = p2v.shape[0]
    for i in range(frames.shape[0]):
        f = frames[i]
        if f < 0 or f >= nframes or p2v[f] != BALLOON:
            return -1
    freed = 0
    for i in range(frames.shape[0]):
        f = frames[i]
        if pstate[f] == MAPPED:
            st[S_MAPPED] -= 1
            host[H_FREE] += 1
            freed += 1
        elif pstate[f] == HOST_SWAPPED:
            st[S_HOST_SWAPPED] -= 1
            host[H_SWAP_FREE] += 1
        pstate[f] = UNBACKED
    return freed


@njit(cache=True)
def balloon_free(frames, st, p2v, free):  # type: ignore[no-untyped-def]
    """The guest OS takes back frames the balloon released; -1 if any was not ballooned."""
    nframes = p2v.shape[0]
    for i in range(frames.shape[0]):
        f = frames[i]
        if f < 0 or f >= nframes or p2v[f] != BALLOON:
            return -1
    for i in range(frames.shape[0]):
        f = frames[i]
        p2v[f] = FREE
        free[st[S_NFREE]] = f
        st[S_NFREE] += 1
        st[S_BALLOON] -= 1
    return frames.shape[0]


@njit(cache=True)
def discard_pages(lo, hi, st, v2p, vswap, p2v, stamp, policy, free, freed_at, now):  # type: ignore[no-untyped-def]
    """The guest drops virtual pages ``[lo, hi)`` as a process frees its memory: their
    frames go on its free list (still backed by machine memory) and their swap slots
    are released, with no I/O. A guest with free page reporting (``freed_at`` not
    empty) notes the time ``now`` for each frame. Returns how many frames were freed."""
    reporting = freed_at.shape[0] > 0
    freed = 0
    for v in range(lo, hi):
        if vswap[v]:
            vswap[v] = 0
            st[S_SWAP_USED] -= 1
        f = v2p[v]
        if f < 0:
            continue
        if policy != CLOCK:
            stamp[f] = 0
        v2p[v] = -1
        p2v[f] = FREE
        free[st[S_NFREE]] = f
        st[S_NFREE] += 1
        st[S_RESIDENT] -= 1
        if reporting:
            freed_at[f] = now
        freed += 1
    return freed


# A frame counts as free for the delay if it went free this long before the
# boundary or more: the boundaries' times are sums of slice lengths, off by a few ulps.
_REPORT_SLACK_S = 1e-9


@njit(cache=True)
def report_free_pages(now, delay_s, st, pstate, free, freed_at, host):  # type: ignore[no-untyped-def]
    """Free page reporting: the guest reports the frames on its free list that still
    have machine memory or a host swap slot behind them and went free at least
    ``delay_s`` before ``now``; the host discards what is behind them (the frames
    become ``UNBACKED``, and the next touch is a host allocation) and they stay on
    the free list. Returns (frames reported, backed free frames left waiting).

    Frames are pushed on the free stack as they go free, so the ones reported lie
    below any still waiting: the guest takes the still-backed frames first, as
    Linux, which moves reported pages to the tail of its free lists, does.
    """
    reported = 0
    waiting = 0
    for i in range(st[S_NFREE]):
        f = free[i]
        state = pstate[f]
        if state == UNBACKED:
            continue
        if now - freed_at[f] < delay_s - _REPORT_SLACK_S:
            waiting += 1
            continue
        if state == MAPPED:
            st[S_MAPPED] -= 1
            st[S_REPORTED] += 1
            host[H_FREE] += 1
        else:  # HOST_SWAPPED: the host drops the slot, nothing is read back
            st[S_HOST_SWAPPED] -= 1
            host[H_SWAP_FREE] += 1
        pstate[f] = UNBACKED
        reported += 1
    return reported, waiting


@njit(cache=True)
def host_page_out(count, st, p2v, pstate, rng, host):  # type: ignore[no-untyped-def]
    """Proactive host paging of up to ``count`` random frames; returns how many."""
    done = 0
    while done < count:
        if not _host_page_out(st, p2v, pstate, rng, host, -1):
            break
        done += 1
    return done


@njit(cache=True)
def mark_samples(n, st, pstate, p2v, sampled, rng):  # type: ignore[no-untyped-def]
    """Clear old marks and pick ``n`` random machine-backed frames to watch this period.

    Returns how many were picked. Kernel frames count as touched: the simulated
    kernel's own references are not modelled, and its memory is always in use.
    """
    sampled[:] = 0
    nframes = pstate.shape[0]
    if st[S_MAPPED] == 0:
        return 0
    picked = 0
    attempts = 0
    limit = 64 * n + nframes
    while picked < n and attempts < limit:
        attempts += 1
        f = _rand_below(rng, nframes)
        if pstate[f] != MAPPED or sampled[f] != 0:
            continue
        sampled[f] = TOUCHED if p2v[f] == KERNEL else SAMPLED
        picked += 1
    return picked


@njit(cache=True)
def count_touched(sampled):  # type: ignore[no-untyped-def]
    n = 0
    for i in range(sampled.shape[0]):
        if sampled[i] == TOUCHED:
            n += 1
    return n


@njit(cache=True)
def build_alias(weights, prob, alias):  # type: ignore[no-untyped-def]
    """Vose's alias method: O(1) sampling from a fixed discrete distribution."""
    n = weights.shape[0]
    total = weights.sum()
    scaled = weights * (n / total)
    small = np.empty(n, dtype=np.int64)
    large = np.empty(n, dtype=np.int64)
    ns = 0
    nl = 0
    for i in range(n):
        if scaled[i] < 1.0:
            small[ns] = i
            ns += 1
        else:
            large[nl] = i
            nl += 1
    while ns > 0 and nl > 0:
        ns -= 1
        s = small[ns]
        nl -= 1
        g = large[nl]
        prob[s] = scaled[s]
        alias[s] = g
        scaled[g] = scaled[g] + scaled[s] - 1.0
        if scaled[g] < 1.0:
            small[ns] = g
            ns += 1
        else:
            large[nl] = g
            nl += 1
    for k in range(nl):
        prob[large[k]] = 1.0
        alias[large[k]] = large[k]
    for k in range(ns):
        prob[small[k]] = 1.0
        alias[small[k]] = small[k]
