"""A compiled cache simulator: one guest's reference stream against one replacement.

It replays the reference stream of :func:`balloonist.sim.engine.run_guest` -- drawn
by the engine's own ``_draw``: the same random number generator, the same zipf alias
tables, the same folding of ranks beyond the active size -- against a cache of
resident pages, and counts what misses once the cache is warm:

* **LRU**: one pass gives every size at once. A reference's *stack distance* is the
  number of distinct pages referenced since the same page last was; with ``m`` pages
  resident it hits exactly when the distance is below ``m``. Distances are counted
  with a Fenwick tree over reference times (each page marks its latest time).
* **CLOCK** and **FIFO**: one pass per size, each replaying the same stream, drawn
  once (``reference_stream``). At a fixed allocation the engine's frames
  holding workload pages form a fixed ring (free, ballooned and kernel frames are
  skipped by the hand), a faulting page takes its victim's frame, CLOCK sets its bit on
  arrival and on every hit, and FIFO's oldest arrival is the ring's next slot.
* **RANDOM**: one pass per size, each miss evicting a slot drawn at random: what the
  host does when it pages a guest it knows nothing about. Its draws come from a
  generator of their own, so the reference stream is the one the others see.

Costs are ignored: only which references miss.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from balloonist.sim import engine as e

# Replacement codes as in the engine.
LRU = e.LRU
CLOCK = e.CLOCK
FIFO = e.FIFO
#: Not a guest's algorithm: the host's random victims (``engine._host_victim``).
RANDOM = 3
#: Seeds the eviction draws of RANDOM, apart from the reference stream's.
_VICTIM_SEED = 0x9E3779B97F4A7C15


@njit(cache=True, inline="always")
def _next_ref(kind, ws_pages, ws_active, alias, rng, pos):  # type: ignore[no-untyped-def]
    """One reference (a rank in ``[0, ws_active)``), drawn by the engine's own
    ``_draw`` (or, for a scan, stepped as ``engine.run_guest`` steps it)."""
    if kind == e.SCAN:
        r = pos[0]
        if r >= ws_active:
            r = 0
        pos[0] = r + 1 if r + 1 < ws_active else 0
        return r
    x, r = e._draw(rng[0], kind, ws_pages, ws_active, alias)
    rng[0] = x
    return r


@njit(cache=True)
def lru_distance_histogram(  # type: ignore[no-untyped-def]
    warm, count, kind, ws_pages, ws_active, alias, seed
):
    """Stack distances of ``count`` references after ``warm`` unrecorded ones.

    The stack starts full, rank 0 on top (the order a long run converges to), so no
    reference is a cold miss: the engine's steady state has touched every page long
    ago. Returns ``hist`` of length ``ws_active``: ``hist[d]`` references had distance
    ``d``.
    """
    total = ws_active + warm + count
    tree = np.zeros(total + 1, dtype=np.int32)  # Fenwick tree over times 1..total
    last = np.zeros(ws_active, dtype=np.int64)  # latest time per page
    hist = np.zeros(ws_active, dtype=np.int64)
    rng = np.array([np.uint64(seed)], dtype=np.uint64)
    pos = np.zeros(1, dtype=np.int64)
    for r in range(ws_active):
        t = ws_active - r
        last[r] = t
        j = t
        while j <= total:
            tree[j] += 1
            j += j & -j
    for t in range(ws_active + 1, total + 1):
        r = _next_ref(kind, ws_pages, ws_active, alias, rng, pos)
        s = last[r]
        # marks after s: pages referenced since, each counted once (at its latest time)
        below = 0
        j = s
        while j > 0:
            below += tree[j]
            j -= j & -j
        d = ws_active - below
        j = s
        while j <= total:
            tree[j] -= 1
            j += j & -j
        j = t
        while j <= total:
            tree[j] += 1
            j += j & -j
        last[r] = t
        if t > ws_active + warm:
            hist[d] += 1
    return hist


@njit(cache=True)
def reference_stream(  # type: ignore[no-untyped-def]
    n, kind, ws_pages, ws_active, alias, seed
):
    """The first ``n`` references (ranks) from ``seed``, as ``engine.run_guest`` draws
    them: drawn once, a stream is replayed at every size a curve measures."""
    stream = np.empty(n, dtype=np.int32)
    rng = np.array([np.uint64(seed)], dtype=np.uint64)
    pos = np.zeros(1, dtype=np.int64)
    for t in range(n):
        stream[t] = _next_ref(kind, ws_pages, ws_active, alias, rng, pos)
    return stream


@njit(cache=True)
def ring_misses(  # type: ignore[no-untyped-def]
    policy, size, warm, count, kind, ws_pages, ws_active, alias, seed
):
    """Misses of ``count`` references (after ``warm``) with ``size`` frames, CLOCK, FIFO
    or RANDOM."""
    stream = reference_stream(warm + count, kind, ws_pages, ws_active, alias, seed)
    return ring_misses_of(policy, size, warm, stream, ws_active, seed)


@njit(cache=True)
def ring_misses_grid(  # type: ignore[no-untyped-def]
    policy, sizes, warm, count, kind, ws_pages, ws_active, alias, seed
):
    """``ring_misses`` at each of ``sizes``, the reference stream drawn once."""
    stream = reference_stream(warm + count, kind, ws_pages, ws_active, alias, seed)
    misses = np.empty(len(sizes), dtype=np.int64)
    for k in range(len(sizes)):
        misses[k] = ring_misses_of(policy, sizes[k], warm, stream, ws_active, seed)
    return misses


@njit(cache=True)
def ring_misses_of(policy, size, warm, stream, ws_active, seed):  # type: ignore[no-untyped-def]
    """Misses of ``stream`` after its first ``warm`` references, with ``size`` frames,
    CLOCK, FIFO or RANDOM (whose victims are drawn from ``seed``'s own generator)."""
    slot_page = np.full(size, -1, dtype=np.int32)
    page_slot = np.full(ws_active, -1, dtype=np.int32)
    refbit = np.zeros(size, dtype=np.int8)
    victims = np.array([np.uint64(seed ^ _VICTIM_SEED) | np.uint64(1)], dtype=np.uint64)
    # Start full with the most popular ranks (scan: the first pages), as a long run
    # would have it, so no reference is a cold miss.
    for f in range(size):
        slot_page[f] = f
        page_slot[f] = f
    hand = 0
    misses = 0
    for t in range(len(stream)):
        r = stream[t]
        f = page_slot[r]
        if f >= 0:
            if policy == CLOCK:
                refbit[f] = 1
            continue
        if t >= warm:
            misses += 1
        if policy == RANDOM:
            f = e._rand_below(victims, size)
        else:
            if policy == CLOCK:
                while refbit[hand]:
                    refbit[hand] = 0
                    hand = hand + 1 if hand + 1 < size else 0
            f = hand
            hand = hand + 1 if hand + 1 < size else 0
        page_slot[slot_page[f]] = -1
        slot_page[f] = r
        page_slot[r] = f
        refbit[f] = 1
    return misses
