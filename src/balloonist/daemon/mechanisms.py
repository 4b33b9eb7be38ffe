"""Where the memory the host got back came from, period by period.

A host gets memory back from its VMs in one order (ESX's): it **shares** identical
pages (KSM), guests **report** the pages they free (free page reporting), the
balloon policy **balloons** the rest, and, as the last resort for a VM whose balloon
does not work, the host **pages** it (:mod:`balloonist.daemon.host_reclaim`). Each
period, for each VM whose memory the host counts
(:class:`~balloonist.model.HostHeld`), what the host holds of its RAM fell by some
amount; that fall is put down first to what the daemon did, then to the guest:

- sharing: what KSM saved for the VM more than the period before (``ksm_stat``);
- ballooning: what its balloon grew by, as far as the rest of the fall goes (a
  balloon that takes pages the guest had already given back frees nothing more);
- host paging: what the host's swap holds of it more than the period before, as far
  as the rest goes;
- reporting: the rest of the fall, which nothing the daemon did explains: the guest
  gave pages back on its own.

A VM that holds more than before freed nothing this period. The figures come only
from what the host counts, so they never add up to more than it really got back.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from balloonist.model import HostHeld


class Mechanism(enum.StrEnum):
    SHARING = "sharing"
    REPORTING = "free_page_reporting"
    BALLOONING = "ballooning"
    HOST_PAGING = "host_paging"


#: The order the host gets memory back in (the fall is put down to what the daemon did
#: first, sharing, ballooning and host paging; the rest is the guests' own reporting).
ORDER: tuple[Mechanism, ...] = (
    Mechanism.SHARING,
    Mechanism.REPORTING,
    Mechanism.BALLOONING,
    Mechanism.HOST_PAGING,
)


class Counted(Protocol):
    """A VM in one period's status (``GuestStatus``)."""

    @property
    def name(self) -> str: ...

    @property
    def balloon_bytes(self) -> int: ...

    @property
    def host(self) -> HostHeld | None: ...


def _zero() -> dict[Mechanism, int]:
    return dict.fromkeys(ORDER, 0)


@dataclass(frozen=True)
class Freed:
    """Memory the host got back, by mechanism: in the last period, and since start."""

    period_bytes: Mapping[Mechanism, int] = field(default_factory=_zero)
    total_bytes: Mapping[Mechanism, int] = field(default_factory=_zero)

    def then(self, period: Mapping[Mechanism, int]) -> Freed:
        """This record followed by a period that freed ``period``."""
        this = {m: period.get(m, 0) for m in ORDER}
        return Freed(this, {m: self.total_bytes.get(m, 0) + this[m] for m in ORDER})


def freed_by_vm(before: Counted, after: Counted) -> dict[Mechanism, int]:
    """What one VM's memory, as the host counts it, fell by between two periods, put
    down to the mechanisms (see the module docstring). Nothing without both counts."""
    was, now = before.host, after.host
    freed = _zero()
    if was is None or now is None:
        return freed
    if was.guest_ram_bytes is not None and now.guest_ram_bytes is not None:
        fall = max(0, was.guest_ram_bytes - now.guest_ram_bytes)
    else:  # its RAM not told apart both times: the whole process, like with like
        fall = max(0, was.held_bytes - now.held_bytes)
    shared = max(0, (now.ksm_saved_bytes or 0) - (was.ksm_saved_bytes or 0))
    freed[Mechanism.SHARING] = min(fall, shared)
    fall -= freed[Mechanism.SHARING]
    freed[Mechanism.BALLOONING] = min(fall, max(0, after.balloon_bytes - before.balloon_bytes))
    fall -= freed[Mechanism.BALLOONING]
    paged = max(0, (now.swapped_bytes or 0) - (was.swapped_bytes or 0))
    freed[Mechanism.HOST_PAGING] = min(fall, paged)
    freed[Mechanism.REPORTING] = fall - freed[Mechanism.HOST_PAGING]
    return freed


def freed_between(before: Iterable[Counted], after: Iterable[Counted]) -> dict[Mechanism, int]:
    """What the VMs in both periods freed, all together, by mechanism."""
    earlier = {g.name: g for g in before}
    total = _zero()
    for guest in after:
        if (was := earlier.get(guest.name)) is not None:
            for mechanism, amount in freed_by_vm(was, guest).items():
                total[mechanism] += amount
    return total


__all__ = ["ORDER", "Counted", "Freed", "Mechanism", "freed_between", "freed_by_vm"]
