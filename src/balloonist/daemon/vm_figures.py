"""What the policy sees of real VMs: pure functions of what the adapter knows.

**Demand from guest statistics.** A real guest gives no page-access samples, so its
working-set observation is built from what virtio-balloon reports:

    used      = min(total, size at the report, at most) - available
    pressure  = (major faults + swap-ins since the last period) x page size
    shortfall = available floor - available now, if positive
    observed  = used + pressure + shortfall, within [0, memory]

``min(total, actual)``: with ``deflate-on-oom`` Linux keeps ballooned pages in its
total and takes them out of "available", without it the total shrinks; either way the
minimum is what the guest has to work with. Pages the guest had to read back in were
needed and not resident, so they count as demand beyond what it uses now. A guest
below its available floor is about to reclaim hard, or, without swap, to OOM-kill:
what it lacks of the floor is demand too. Without these two terms a guest could never
look bigger than what it already holds.

**A report is older than the balloon's last step.** The guest reports on its own
timer, so a report may predate a step the daemon read since; read against the new
size it would show the guest using less by the step, and keeping its available
memory still (:func:`available_now`). The report was made between the reading before
and the reading that first saw it, so ``used`` is taken at the larger of their two
sizes: it may overstate the use by one step for a period, never understate it (an
understated use would make the next step go further). "Available now" is the
report's less what the balloon took since, as a range over the same two readings;
its free memory now, the least it may be (:func:`free_now_bytes`).

**Host memory** for the policy is the budget, or less when the host is short for
reasons of its own: never more than what the guests hold (their balloons' actual
sizes) plus the host's ``MemAvailable``. Free memory is that minus what they hold.
A VM that could not be sampled this period still holds its last known size. When the
guests' minimums and the sizes uncooperative guests are held at add up to more than
that, the memory is in use regardless: the policy is given that much, so it holds
everyone at their minimum instead of refusing to decide (logged once).

**The host's own count** (:class:`~balloonist.model.HostTruth`) sits next to that:
what the VMs' QEMU processes really hold (their proportional set sizes, so pages KSM
merged count once; a VM whose process cannot be read counts at its balloon's size),
and what they could still take: the budget less that, or the host's
``MemAvailable`` if smaller.
"""

from __future__ import annotations

from dataclasses import dataclass

from balloonist.daemon.pacing import AvailableNow
from balloonist.host import HostMemInfo
from balloonist.model import HostReading, HostTruth
from balloonist.qemu.qmp import GuestStats
from balloonist.units import PAGE_SIZE_BYTES


def observed_demand_bytes(
    report_size_bytes: int,
    memory_bytes: int,
    stats: GuestStats | None,
    new_faults: int,
    short_bytes: int = 0,
) -> int | None:
    """The working-set observation from guest statistics (see the module docstring):
    ``report_size_bytes``, the most it held when ``stats`` was made; ``short_bytes``,
    what it lacks of its available floor now."""
    if stats is None or stats.total_bytes is None or stats.available_bytes is None:
        return None
    used = max(0, min(stats.total_bytes, report_size_bytes) - stats.available_bytes)
    pressure = max(0, new_faults) * PAGE_SIZE_BYTES
    return min(memory_bytes, used + pressure + short_bytes)


def available_now(
    report: GuestStats | None, seen_at_bytes: int, seen_after_bytes: int, actual_bytes: int
) -> AvailableNow | None:
    """The guest's available memory now, by its report ``report`` less what its
    balloon took since (a deflation since adds): the report was made after a reading
    of size ``seen_after_bytes`` and before the one of size ``seen_at_bytes`` that
    first saw it. None if it does not report its available memory."""
    if report is None or report.available_bytes is None:
        return None
    available = report.available_bytes
    low = available - _most_taken_since_bytes(seen_at_bytes, seen_after_bytes, actual_bytes)
    high = available - (seen_at_bytes - actual_bytes)
    return AvailableNow(low_bytes=max(0, low), high_bytes=max(0, high))


def free_now_bytes(
    report: GuestStats | None, seen_at_bytes: int, seen_after_bytes: int, actual_bytes: int
) -> int | None:
    """The least free memory the guest may have now: its report's less the most its
    balloon may have taken since (as :func:`available_now`). The policy reads the
    guest's use as its size now less this, so a report older than an inflation never
    shows the guest using less by the step. None if it does not report free memory."""
    if report is None or report.free_bytes is None:
        return None
    taken = _most_taken_since_bytes(seen_at_bytes, seen_after_bytes, actual_bytes)
    return max(0, report.free_bytes - taken)


def _most_taken_since_bytes(seen_at_bytes: int, seen_after_bytes: int, actual_bytes: int) -> int:
    """The most a balloon may have taken since a report made between a reading of size
    ``seen_after_bytes`` and the next, of ``seen_at_bytes`` (negative: it gave back)."""
    return max(seen_at_bytes, seen_after_bytes) - actual_bytes


def available_short_bytes(available: AvailableNow | None, floor_bytes: int) -> int | None:
    """What the guest surely lacks of its available floor now (0 if it may have it);
    None if it does not report its available memory."""
    if available is None:
        return None
    return max(0, floor_bytes - available.high_bytes)


def available_fall_bytes(
    before: GuestStats | None, before_actual_bytes: int, now: GuestStats, actual_bytes: int
) -> int | None:
    """How much the guest's available memory fell between its last two reports, less
    what its balloon took meanwhile: what a burst of allocations under way used in the
    last interval (0 if it did not fall, or no new report came); None if the guest
    does not report its available memory."""
    if now.available_bytes is None:
        return None
    if before is None or before.available_bytes is None:
        return 0
    if now.last_update_s == before.last_update_s:
        return 0  # the same report again: nothing new is known
    taken = max(0, before_actual_bytes - actual_bytes)
    return max(0, before.available_bytes - now.available_bytes - taken)


def use_growth_bytes_per_s(
    report: GuestStats | None, report_actual_bytes: int, now: GuestStats, actual_bytes: int
) -> float:
    """How fast the guest's memory in use grew from its earlier report ``report``
    (made when it held ``report_actual_bytes``) to its newer report ``now``: its
    available memory's fall less what its balloon took between them, per second of
    the reports' interval (0 if it did not grow, or ``report`` is its first).

    Both figures come from the guest's own reports, taken on the guest's timer, so a
    balloon that moved after the report was made is not read as the guest's use: a
    deflation raises available memory, which never counts as growth, and an inflation
    the report does not show yet only makes the figure smaller.
    """
    if report is None:
        return 0.0
    fall = available_fall_bytes(report, report_actual_bytes, now, actual_bytes) or 0
    return fall / max(1, now.last_update_s - report.last_update_s)


@dataclass(frozen=True)
class HostMemory:
    """The memory the VMs may share, as the policy gets it."""

    shareable_bytes: int  # the budget, or what they hold plus what the host has left
    held_bytes: int  # what the VMs hold now
    reserved_bytes: int  # their minimums, uncooperative ones at the size they are held

    @property
    def over_reserved(self) -> bool:
        """The minimums do not fit: the memory is in use anyway, everyone at theirs."""
        return self.reserved_bytes > self.shareable_bytes

    @property
    def memory_bytes(self) -> int:
        return max(self.shareable_bytes, self.reserved_bytes)

    @property
    def free_bytes(self) -> int:
        return max(0, self.memory_bytes - self.held_bytes)

    def reading(
        self, time_s: float, info: HostMemInfo, cpus: int | None, truth: HostTruth | None = None
    ) -> HostReading:
        """The scheduler's reading of the host: this memory, the host's swap, and the
        host's own count of the VMs' memory (``truth``)."""
        return HostReading(
            time_s=time_s,
            memory_bytes=self.memory_bytes,
            free_bytes=self.free_bytes,
            swap_bytes=info.swap_total_bytes,
            swap_used_bytes=info.swap_total_bytes - info.swap_free_bytes,
            cpus=cpus,
            truth=truth,
        )


def host_memory(
    budget_bytes: int, info: HostMemInfo, held_bytes: int, reserved_bytes: int
) -> HostMemory:
    """The memory the VMs share (see the module docstring). ``held_bytes``: what they
    hold; ``reserved_bytes``: their minimums as the policy gets them."""
    # The budget is what the VMs may hold; the host may still run short of it for
    # reasons of its own (other processes, pinned cache), and then the VMs share
    # only what they hold plus what the host has available.
    shareable = min(budget_bytes, held_bytes + info.available_bytes)
    return HostMemory(shareable, held_bytes, reserved_bytes)


def host_truth(budget_bytes: int, info: HostMemInfo, held_bytes: int) -> HostTruth:
    """The host's own count (see the module docstring); ``held_bytes``: what the VMs'
    processes hold, by the host's count."""
    free = min(budget_bytes - held_bytes, info.available_bytes)
    return HostTruth(budget_bytes, held_bytes, info.available_bytes, max(0, free))


__all__ = [
    "HostMemory",
    "available_fall_bytes",
    "available_now",
    "available_short_bytes",
    "host_memory",
    "host_truth",
    "observed_demand_bytes",
    "use_growth_bytes_per_s",
]
