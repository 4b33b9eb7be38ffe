"""Whole-state consistency checks of a simulated guest (slow: for tests and debugging)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from balloonist.errors import SimulationError
from balloonist.sim import engine as e
from balloonist.sim.guest_memory import GuestMemory


def check_guest(m: GuestMemory) -> None:
    """Raise SimulationError naming the first broken invariant."""
    name = m.spec.name
    st = m.st
    p2v, pstate, v2p = m.p2v, m.pstate, m.v2p

    def fail(what: str) -> None:
        raise SimulationError(f"{name}: {what}")

    ballooned = p2v == e.BALLOON
    if np.any(pstate[ballooned] != e.UNBACKED):
        fail("a frame is both pinned by the balloon and backed by machine memory")
    if int(ballooned.sum()) != st[e.S_BALLOON]:
        fail("balloon count does not match the frames it pins")
    if int((pstate == e.MAPPED).sum()) != st[e.S_MAPPED]:
        fail("mapped count does not match the physical-to-machine map")
    if int((pstate == e.HOST_SWAPPED).sum()) != st[e.S_HOST_SWAPPED]:
        fail("host-swapped count does not match the map")
    resident = np.flatnonzero(p2v >= 0)
    if resident.size != st[e.S_RESIDENT]:
        fail("resident count is off")
    if np.any(pstate[resident] == e.UNBACKED):
        # e.g. a frame free page reporting gave back while a page was still in it
        fail("a resident page's frame has neither machine memory nor host swap behind it")
    if np.any(v2p[p2v[resident]] != resident):
        fail("page tables disagree (p2v -> v2p)")
    mapped_v = np.flatnonzero(v2p >= 0)
    if np.any(p2v[v2p[mapped_v]] != mapped_v):
        fail("page tables disagree (v2p -> p2v)")
    if np.any(m.vswap[mapped_v] != 0):
        fail("a resident page still holds a swap slot")
    if int(m.vswap.sum()) != st[e.S_SWAP_USED]:
        fail("swap slot count is off")
    for problem in (_free_list_problem(m), _order_problem(m, resident)):
        if problem is not None:
            fail(problem)


def _free_list_problem(m: GuestMemory) -> str | None:
    nfree = int(m.st[e.S_NFREE])
    free = m.free[:nfree]
    if np.unique(free).size != nfree or np.any(m.p2v[free] != e.FREE):
        return "free list is not exactly the free frames"
    if int((m.p2v == e.FREE).sum()) != nfree:
        return "a free frame is missing from the free list"
    return None


def _order_problem(m: GuestMemory, resident: npt.NDArray[np.intp]) -> str | None:
    """What is wrong with an LRU or FIFO guest's resident order, if anything."""
    if int(m.guest.replacement) == e.CLOCK:
        return None
    in_order = np.flatnonzero(m.stamp > 0)
    if not np.array_equal(in_order, resident):
        return "the resident order is not exactly the resident frames"
    stamps = m.stamp[in_order]
    if np.unique(stamps).size != stamps.size or np.any(stamps >= m.st[e.S_STAMP]):
        return "the resident order's stamps are not distinct and older than its count"
    return None
