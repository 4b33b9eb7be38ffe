"""Host-side pacing and safety for real guests (the patent's claim 8, host variant).

Linux's virtio-balloon driver inflates as fast as the host asks, so the daemon paces
it: each guest's target moves towards the policy's wish in steps whose size follows
the shared :class:`~balloonist.rate.AdaptiveRate`. A step the guest reached grows the
next one; a step it did not reach within a period cuts the rate, and stands until the
guest reaches it (a target raised mid-step would make it take back memory it just
gave). A guest whose balloon does not move at all for ``stall_timeout_s`` is marked
uncooperative, and the policy stops counting on getting memory from it. Deflating
(giving memory back) is never paced: a guest that needs memory should not wait.

Safety, applied to every target sent, in this order:

1. never below the VM's ``min`` or above its ``max``;
2. never so low that the guest would keep less than ``available_floor_bytes`` of
   available memory, unless that would break ``max``; a guest with less is held
   where it is (the policy decides whether it gets more). The guest reports on its
   own timer, maybe before the balloon's last step, so the adapter gives its
   available memory now as a range (:class:`AvailableNow`), and this rule takes the
   low end: a step read against a report that predates the last one would take
   the floor too;
3. on start, the first target is the guest's current size: a restarted daemon moves
   nobody's memory abruptly.

Everything here is pure bookkeeping on numbers; the adapter does the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from balloonist.rate import AdaptiveRate, RateLimits
from balloonist.units import MIB, PAGE_SIZE_BYTES

#: A step counts as reached when the guest is within this of the commanded size: the
#: driver works in pages and QEMU reports in whole pages, but guests round differently.
REACHED_TOLERANCE_BYTES: Final = 4 * MIB
#: Default time a balloon may sit still, with a step outstanding, before the guest is
#: called uncooperative (a guest that cannot allocate, or a driver that is gone).
DEFAULT_STALL_TIMEOUT_S: Final = 30.0
#: Default memory a guest always keeps available: below this, Linux starts reclaiming
#: hard and the OOM killer is near.
DEFAULT_AVAILABLE_FLOOR_BYTES: Final = 64 * MIB
#: Host-side rate defaults, in pages per period (1 s): start at 16 MiB, +32 MiB per
#: reached step, halve on a missed one, at most 1 GiB. Under TCG a guest inflates
#: about 256 MiB/s; under KVM several GiB/s.
HOST_RATE_LIMITS: Final = RateLimits(
    min_units=16 * MIB // PAGE_SIZE_BYTES,
    max_units=1024 * MIB // PAGE_SIZE_BYTES,
    increase_units=32 * MIB // PAGE_SIZE_BYTES,
    divisor=2.0,
)


@dataclass(frozen=True)
class AvailableNow:
    """A guest's available memory now, by its last report less what its balloon took
    since: at least ``low_bytes`` and at most ``high_bytes``."""

    low_bytes: int
    high_bytes: int

    @classmethod
    def exactly(cls, available_bytes: int) -> AvailableNow:
        return cls(available_bytes, available_bytes)


@dataclass(frozen=True)
class Bounds:
    min_bytes: int
    max_bytes: int
    available_floor_bytes: int = DEFAULT_AVAILABLE_FLOOR_BYTES


def safe_target(
    wanted_bytes: int, actual_bytes: int, available: AvailableNow | None, bounds: Bounds
) -> int:
    """The lowest target we will send for a wish of ``wanted_bytes`` (rules 1 and 2)."""
    target = wanted_bytes
    if available is not None:
        # Taking (actual - target) away must leave at least the floor available.
        spare_bytes = max(0, available.low_bytes - bounds.available_floor_bytes)
        target = max(target, actual_bytes - spare_bytes)
    target = min(max(target, bounds.min_bytes), bounds.max_bytes)
    return target // PAGE_SIZE_BYTES * PAGE_SIZE_BYTES


@dataclass
class GuestPacer:
    """Pacing state of one guest. ``commanded_bytes`` is what we last sent."""

    bounds: Bounds
    commanded_bytes: int
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S
    rate: AdaptiveRate = field(default_factory=lambda: AdaptiveRate(HOST_RATE_LIMITS))
    cooperative: bool = True
    _last_actual: int | None = None
    _still_since_s: float | None = None
    _probed_at_s: float = float("-inf")

    @classmethod
    def starting_at(
        cls,
        actual_bytes: int,
        bounds: Bounds,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    ) -> GuestPacer:
        """Rule 3: begin where the guest is, so a (re)start moves nothing."""
        return cls(bounds=bounds, commanded_bytes=actual_bytes, stall_timeout_s=stall_timeout_s)

    def step(
        self, wanted_bytes: int, actual_bytes: int, available: AvailableNow | None, now_s: float
    ) -> int:
        """The next target to send, given the policy's wish and what the guest did."""
        last, self._last_actual = self._last_actual, actual_bytes
        self._observe(last, actual_bytes, now_s)
        goal = safe_target(wanted_bytes, actual_bytes, available, self.bounds)
        if goal >= actual_bytes:
            # Deflating, or holding: no pacing, no reason to wait.
            self.commanded_bytes = goal
            return goal
        step_bytes = self.rate.step_units * PAGE_SIZE_BYTES
        if not self.cooperative:
            # Do not count on it: hold it where it is, and once per stall timeout probe
            # with the smallest step to find out whether it works again.
            if now_s - self._probed_at_s >= self.stall_timeout_s:
                self._probed_at_s = now_s
                step_bytes = self.rate.limits.min_units * PAGE_SIZE_BYTES
            else:
                step_bytes = 0
        paced = actual_bytes - step_bytes
        if self.cooperative and last is not None and actual_bytes <= last:
            # A step the guest is still working on is not taken back: it may be past
            # the size we read, so a higher target would make it take back memory it
            # just gave (a virtio-mem guest unplugging towards the last target plugs
            # blocks back). A slow guest's smaller rate shows from its next step on.
            # A guest that grew since (it deflated on its own) is paced from its size.
            paced = min(paced, self.commanded_bytes)
        self.commanded_bytes = max(goal, paced)
        return self.commanded_bytes

    def _observe(self, last: int | None, actual_bytes: int, now_s: float) -> None:
        """Judge the step outstanding since the guest was at ``last`` by where it is now."""
        asked = 0 if last is None else last - self.commanded_bytes
        if asked <= REACHED_TOLERANCE_BYTES:
            self._still_since_s = None  # no inflation step was outstanding
            return
        reached = actual_bytes - self.commanded_bytes <= REACHED_TOLERANCE_BYTES
        assert last is not None  # asked > 0 needs a previous reading
        # In bytes: record only compares what was obtained with what was asked.
        self.rate.record(requested=asked, obtained=asked if reached else last - actual_bytes)
        if reached:
            self.cooperative = True
            self._still_since_s = None
        elif abs(actual_bytes - last) > REACHED_TOLERANCE_BYTES:
            self._still_since_s = None  # slow, but moving
        elif self._still_since_s is None:
            self._still_since_s = now_s
        elif self.cooperative and now_s - self._still_since_s >= self.stall_timeout_s:
            self.cooperative = False
            self._probed_at_s = now_s
