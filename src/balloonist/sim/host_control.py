"""How the simulated host holds its guests to the policy's targets between driver steps.

Free machine memory is one pool that guests draw from as they touch pages. Before
each slice the host gives every guest its limits, as the compiled loop takes them:
the most machine pages it may hold (its cap), its min, the free pages kept back for
the other guests still below their reservations, and whether the host may page it
when no free page is left. Where the policy's mechanisms allow host paging, the host
also pages guests above target out proactively, at its swap's bandwidth. And before
the limits, it takes back what the guests with free page reporting report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from balloonist.model import Mechanisms
from balloonist.sim import engine as e
from balloonist.sim.guest_memory import I64, GuestMemory

#: The slots of a guest's limits array, in the compiled loop's order.
_CAP, _MIN, _RESERVE, _PAGEABLE = range(4)


@dataclass(frozen=True)
class Targets:
    """The policy's last decision, as the host enforces it (pages, per guest)."""

    allocation_pages: I64
    mechanisms: Mechanisms
    #: What the instant mover balloons each guest to (every guest, driver or not).
    balloon_pages: I64
    #: The guests the host holds to their allocation itself (``GuestTarget.host_capped``):
    #: it pages them whatever the mechanisms say.
    host_capped: npt.NDArray[np.bool_]

    @classmethod
    def at_limits(cls, limit_pages: I64, frames: I64) -> Targets:
        """Before the first decision: every guest at its limit, ballooned there."""
        return cls(
            allocation_pages=limit_pages.copy(),
            mechanisms=Mechanisms(balloon=True),
            balloon_pages=frames - limit_pages,
            host_capped=np.zeros(len(limit_pages), dtype=np.bool_),
        )


class HostControl:
    """The limits the host sets its guests, its proactive paging, and the memory it
    takes back from free page reports."""

    def __init__(self, guests: Sequence[GuestMemory], host: I64, costs: npt.NDArray[np.float64]):
        self._guests = guests
        self._host = host
        self._costs = costs
        self._limits = [np.zeros(4, dtype=np.int64) for _ in guests]
        # The guests with free page reporting: the others have nothing to report.
        self._reporting = [m for m in guests if m.reporting_delay_s is not None]

    def take_reported(self, time_s: float) -> None:
        """At a slice boundary, before the limits: each guest with free page reporting
        reports the pages free for its delay, and the host drops the memory behind
        them (``GuestMemory.report_free_pages``)."""
        for m in self._reporting:
            m.report_free_pages(self._host, time_s)

    def limits(self, index: int) -> I64:
        """(cap, min, reserve, pageable) for one guest, as the compiled loop takes them."""
        return self._limits[index]

    @property
    def all_limits(self) -> list[I64]:
        return self._limits

    def set_limits(self, t: Targets, limit_pages: I64, min_pages: I64) -> npt.NDArray[np.bool_]:
        """Every guest's limits for the next slice; returns which guests are blocked.

        The host enforces a guest's allocation target as its cap only while it is
        allowed to page (HARD and LOW states, or a policy with no balloon), and blocks
        guests above target in LOW.
        """
        mapped = np.array([m.mapped_pages for m in self._guests], dtype=np.int64)
        target = t.allocation_pages
        cap = np.where(self.pageable(t), np.minimum(target, limit_pages), limit_pages)
        deficit = np.clip(min_pages - mapped, 0, None)
        reserve = int(deficit.sum()) - deficit
        # A guest at its limit with pages in host swap (it was host-capped) can bring
        # one back only if the host pages out another of its own, as a cgroup's limit
        # does, so the host may page it while it is there; else it would wait every
        # slice for a frame its limit never gives it.
        held_out = np.array([int(m.st[e.S_HOST_SWAPPED]) > 0 for m in self._guests], dtype=np.bool_)
        swappable = self.pageable(t, emergency=True) | (held_out & (mapped >= limit_pages))
        for i, lim in enumerate(self._limits):
            lim[_CAP] = cap[i]
            lim[_MIN] = min_pages[i]
            lim[_RESERVE] = reserve[i]
            lim[_PAGEABLE] = swappable[i]
        blocked: npt.NDArray[np.bool_] = (mapped > target) & t.mechanisms.block_over_target
        return blocked

    def pageable(self, t: Targets, *, emergency: bool = False) -> npt.NDArray[np.bool_]:
        """Which guests the host may page this period (see ``Mechanisms``): to enforce
        their targets, or, in an ``emergency`` (no free page for a guest that touches
        one), to make room. A plain Linux host swaps anyone in an emergency; with
        ``host_paging_ballooned`` off the host never swaps a guest its balloon serves,
        which then waits for memory instead (a per-VM cgroup limit would do this)."""
        mech = t.mechanisms
        ballooned = np.array(
            [m.spec.balloon and mech.balloon for m in self._guests], dtype=np.bool_
        )
        allowed = (emergency or mech.host_paging) & (mech.host_paging_ballooned | ~ballooned)
        pageable: npt.NDArray[np.bool_] = np.broadcast_to(allowed, ballooned.shape) | t.host_capped
        return pageable

    def page_out(self, t: Targets, slice_s: float, first: int) -> None:
        """Proactive host paging of guests above target, at the host swap's bandwidth.

        The bandwidth is shared in turn from guest ``first`` on (the caller rotates
        it), so no guest is always paged first.
        """
        if not (t.mechanisms.host_paging or t.host_capped.any()):
            return
        swap_out_s = float(self._costs[e.C_HOST_SWAP_OUT])
        budget = int(slice_s / swap_out_s) if swap_out_s > 0 else 1 << 30
        n = len(self._guests)
        pageable = self.pageable(t)
        for j in range(n):
            i = (first + j) % n
            m = self._guests[i]
            if not pageable[i]:
                continue
            excess = m.mapped_pages - int(t.allocation_pages[i])
            if excess > 0 and budget > 0:
                done = int(
                    e.host_page_out(min(excess, budget), m.st, m.p2v, m.pstate, m.rng, self._host)
                )
                budget -= done


__all__ = ["HostControl", "Targets"]
