"""One managed VM's life in the QEMU adapter, and what the adapter keeps of it.

A VM's life is one state, moved only along the arrows below; any other move is a bug
and raises :class:`~balloonist.errors.StateError` (as ``qemu.qmp``'s ``Runstate``)::

    NEW           -> CONNECTED     connected
                  -> RECONNECTING  connecting failed
    CONNECTED     -> SAMPLED       read this period
                  -> RECONNECTING  a request failed
    SAMPLED       -> CONNECTED     the next period begins
                  -> RECONNECTING  a request failed
    RECONNECTING  -> CONNECTED     connected again
                  -> RECONNECTING  failed again
    any but GONE  -> BROKEN        an answer that will not change (no balloon device)
    any           -> GONE          no longer recorded, or its QEMU exited

``SAMPLED`` means this period's figures are current and a target may be sent;
``RECONNECTING`` is asked again next period; ``BROKEN`` (no balloon device, an answer
that will not change) is left alone, held where it was last seen.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass, replace
from typing import Final

from balloonist.daemon.counters import Counts, FailureCounter
from balloonist.daemon.pacing import REACHED_TOLERANCE_BYTES, AvailableNow, Bounds, GuestPacer
from balloonist.daemon.processors import VmProcessors
from balloonist.daemon.vm_figures import (
    available_fall_bytes,
    available_now,
    available_short_bytes,
    free_now_bytes,
    observed_demand_bytes,
    use_growth_bytes_per_s,
)
from balloonist.daemon.vm_ports import VmMemoryHost, VmPort
from balloonist.errors import StateError
from balloonist.model import CpuSample, GuestSample, GuestSpec, HostHeld
from balloonist.qemu.launcher import VMRecord
from balloonist.qemu.qmp import GuestStats
from balloonist.units import PAGE_SIZE_BYTES, format_size

log = logging.getLogger("balloonist.daemon")


class VmLife(enum.Enum):
    NEW = "new"
    CONNECTED = "connected"
    SAMPLED = "sampled"
    RECONNECTING = "reconnecting"
    BROKEN = "broken"
    GONE = "gone"


_MOVES: Final[dict[VmLife, frozenset[VmLife]]] = {
    VmLife.NEW: frozenset({VmLife.CONNECTED, VmLife.RECONNECTING}),
    VmLife.CONNECTED: frozenset({VmLife.SAMPLED, VmLife.RECONNECTING}),
    VmLife.SAMPLED: frozenset({VmLife.CONNECTED, VmLife.RECONNECTING}),
    VmLife.RECONNECTING: frozenset({VmLife.CONNECTED, VmLife.RECONNECTING}),
    VmLife.BROKEN: frozenset(),
    VmLife.GONE: frozenset(),
}


@dataclass(frozen=True)
class VmFailures:
    """One VM's failures, cumulative, each a counter of its own."""

    transient_errors: int = 0  # a request failed and is retried (reconnecting)
    fatal_errors: int = 0  # a request failed for good: the VM is left alone
    stalls: int = 0  # its balloon stopped following its target
    agent_rejected: int = 0  # messages its agent sent that were refused

    def __add__(self, other: VmFailures) -> VmFailures:
        return VmFailures(
            self.transient_errors + other.transient_errors,
            self.fatal_errors + other.fatal_errors,
            self.stalls + other.stalls,
            self.agent_rejected + other.agent_rejected,
        )

    def as_counters(self) -> Counts:
        """As the daemon's status and metrics count them (``daemon/counters.py``)."""
        return {
            FailureCounter.TRANSIENT_ERRORS: self.transient_errors,
            FailureCounter.FATAL_ERRORS: self.fatal_errors,
            FailureCounter.STALLS: self.stalls,
            FailureCounter.AGENT_REJECTED: self.agent_rejected,
        }


@dataclass(frozen=True)
class VmView:
    """One managed VM as the adapter sees it now (for status, tools and tests)."""

    name: str
    life: VmLife
    actual_bytes: int | None  # its size, if it was sampled this period
    last_sent_bytes: int | None  # the last target sent to it
    sent_count: int  # targets sent since it was first managed
    vcpu_threads: dict[int, int] | None  # once the daemon drives its processors
    port: VmPort | None  # once it was first asked


@dataclass
class ManagedVm:
    """What the adapter keeps of one VM between periods."""

    record: VMRecord
    port: VmPort | None = None
    pacer: GuestPacer | None = None  # made at its first sample
    actual_bytes: int = 0  # its size at the last sample
    stats: GuestStats | None = None
    faults: int | None = None  # major faults + swap-ins at the last sample
    observed_bytes: int | None = None
    available_fall_bytes: int | None = None  # since its previous report
    use_growth_bytes_per_s: float | None = None  # between its last two reports
    report: GuestStats | None = None  # its latest report of available memory ...
    report_actual_bytes: int = 0  # ... its size when that report was first seen ...
    report_after_bytes: int = 0  # ... and at the reading before (it was made between)
    host: HostHeld | None = None  # what the host counted it holds at the last sample
    cpu: VmProcessors | None = None  # its processors, when the daemon shares them
    last_sent_bytes: int | None = None  # the last target sent to it
    sent_count: int = 0
    transient_errors: int = 0
    fatal_errors: int = 0
    stalls: int = 0
    closing: asyncio.Task[None] | None = None  # its port's close, while under way
    _life: VmLife = VmLife.NEW

    @property
    def life(self) -> VmLife:
        return self._life

    def move_to(self, to: VmLife) -> None:
        """Move along one of the module docstring's arrows; anything else is a bug."""
        allowed = to is VmLife.GONE or (to is VmLife.BROKEN and self._life is not VmLife.GONE)
        if not allowed and to not in _MOVES[self._life]:
            raise StateError(f"VM {self.record.name}", self._life, to)
        self._life = to

    async def closed(self) -> None:
        """Wait until a close of its port that is under way has ended."""
        if self.closing is not None:
            closing, self.closing = self.closing, None
            await asyncio.gather(closing, return_exceptions=True)

    @property
    def connected(self) -> bool:
        """Its port's connection is open."""
        return self._life in (VmLife.CONNECTED, VmLife.SAMPLED)

    @property
    def sampled(self) -> bool:
        """This period's figures are current."""
        return self._life is VmLife.SAMPLED

    def observe(
        self, actual_bytes: int, stats: GuestStats, bounds: Bounds, stall_timeout_s: float
    ) -> None:
        """Fold in this period's reading: its size, its statistics, its demand."""
        faults_now = (stats.major_faults or 0) + (stats.swap_in_pages or 0)
        new_faults = 0 if self.faults is None else faults_now - self.faults
        self.faults = faults_now
        self.available_fall_bytes = available_fall_bytes(
            self.stats, self.actual_bytes, stats, actual_bytes
        )
        self._measure_growth(stats, actual_bytes)
        self.actual_bytes = actual_bytes
        self.stats = stats
        short = available_short_bytes(self.available, bounds.available_floor_bytes) or 0
        # Its use at the larger of the two sizes its report was made between: at worst
        # it overstates the use by the balloon's last step (the next inflation waits,
        # a deflation goes one step further). At the smaller, a report that predates
        # an inflation would understate the use by the step, and the next step would
        # go further still.
        size_bytes = max(self.report_actual_bytes, self.report_after_bytes)
        self.observed_bytes = observed_demand_bytes(
            size_bytes, self.record.memory_bytes, self.report, new_faults, short
        )
        if self.pacer is None:
            self.pacer = GuestPacer.starting_at(actual_bytes, bounds, stall_timeout_s)

    def _measure_growth(self, stats: GuestStats, actual_bytes: int) -> None:
        """Its use's growth between reports; a period with no new report keeps the
        last figure (a rate stays true until the guest says otherwise)."""
        if stats.available_bytes is None:
            self.use_growth_bytes_per_s = None
            self.report = None
        elif self.report is None or stats.last_update_s != self.report.last_update_s:
            self.use_growth_bytes_per_s = use_growth_bytes_per_s(
                self.report, self.report_actual_bytes, stats, actual_bytes
            )
            # Before this reading it had its last reading's size (if it had one).
            self.report_after_bytes = actual_bytes if self.stats is None else self.actual_bytes
            self.report, self.report_actual_bytes = stats, actual_bytes

    @property
    def free_now_bytes(self) -> int | None:
        """Its free memory now, the least its latest report allows (:func:`free_now_bytes`)."""
        if self.report is None:  # no available figure, so no report is followed: as read
            return None if self.stats is None else self.stats.free_bytes
        return free_now_bytes(
            self.report, self.report_actual_bytes, self.report_after_bytes, self.actual_bytes
        )

    @property
    def available(self) -> AvailableNow | None:
        """Its available memory now, by its latest report (:func:`available_now`)."""
        return available_now(
            self.report, self.report_actual_bytes, self.report_after_bytes, self.actual_bytes
        )

    def next_target_bytes(self, wanted_bytes: int, now_s: float) -> int | None:
        """The next paced step toward what the policy wants; None if it was sent already."""
        assert self.pacer is not None  # by observe()
        name = self.record.name
        was_cooperative = self.pacer.cooperative
        next_bytes = self.pacer.step(wanted_bytes, self.actual_bytes, self.available, now_s)
        if was_cooperative and not self.pacer.cooperative:
            self.stalls += 1
            log.warning("%s: balloon stalled; uncooperative", name)
        log.debug(
            "%s: actual %s, observed %s, policy %s, sending %s",
            name,
            format_size(self.actual_bytes),
            format_size(self.observed_bytes or 0),
            format_size(wanted_bytes),
            format_size(next_bytes),
        )
        # A target it has had is sent again only if the guest holds less than it: its
        # balloon was inflated behind our back (virsh setmem, another QMP client), and
        # giving memory back is always safe. One that holds more (its driver deflated
        # on OOM) keeps it until the policy's target moves.
        behind = next_bytes - self.actual_bytes > REACHED_TOLERANCE_BYTES
        return None if self.last_sent_bytes == next_bytes and not behind else next_bytes

    @property
    def cooperative(self) -> bool:
        """Whether the policy may move it: sampled now, its port and its pacer agreeing."""
        if self.pacer is None:
            return True  # never sampled: not in the policy's view yet
        reachable = self.sampled and self.port is not None and self.port.cooperative
        return reachable and self.pacer.cooperative

    @property
    def held_bytes(self) -> int:
        """The machine memory it holds: its last known size, all of it if never sampled
        (a VM that cannot be asked must not look like free memory)."""
        return self.actual_bytes if self.pacer is not None else self.record.memory_bytes

    def held_spec(self, spec: GuestSpec) -> GuestSpec:
        """Its spec for the policy: as configured, or held where it is if uncooperative
        (do not count on memory it will not give)."""
        if self.cooperative:
            return spec
        held = max(spec.min_bytes, min(self.actual_bytes, spec.limit_bytes))
        return replace(spec, min_bytes=held, max_bytes=held)

    def host_held(self, memory: VmMemoryHost) -> HostHeld | None:
        """What the host counts its QEMU process holds now (kept as :attr:`host`);
        None if that is not known."""
        r = self.record
        self.host = None if r.pid is None else memory.held(r.pid, r.memory_bytes, r.ram_file)
        return self.host

    @property
    def truly_held_bytes(self) -> int:
        """What it holds by the host's count where known, else by its balloon's."""
        return self.host.held_bytes if self.host is not None else self.held_bytes

    def fresh_sample(
        self,
        period_s: float,
        cpu: CpuSample | None,
        host: HostHeld | None = None,
        *,
        host_cappable: bool = False,
    ) -> GuestSample:
        """Its sample from this period's reading (:meth:`observe`); ``host``: what the
        host counts it holds; ``host_cappable``: whether the host could page it past
        its allocation (``HostReclaim.paging_of``)."""
        r, pacer, stats = self.record, self.pacer, self.stats
        assert pacer is not None and stats is not None  # by observe()
        return GuestSample(
            name=r.name,
            allocated_bytes=self.actual_bytes,
            balloon_bytes=r.memory_bytes - self.actual_bytes,
            balloon_target_bytes=r.memory_bytes - pacer.commanded_bytes,
            active_bytes_observed=self.observed_bytes,
            free_bytes=self.free_now_bytes,
            available_short_bytes=available_short_bytes(
                self.available, pacer.bounds.available_floor_bytes
            ),
            available_fall_bytes=self.available_fall_bytes,
            use_growth_bytes_per_s=self.use_growth_bytes_per_s,
            major_faults=stats.major_faults or 0,
            memory_stall_s=stats.stall_s,
            swap_used_bytes=stats.swap_used_bytes,
            host_cappable=host_cappable,
            cooperative=self.cooperative,
            inflate_rate_bytes_per_s=pacer.rate.step_units * PAGE_SIZE_BYTES / period_s,
            cpu=cpu,
            host=host,
        )

    def stale_sample(self) -> GuestSample:
        """Known from earlier periods but not asked now: as it was last, uncooperative."""
        r = self.record
        return GuestSample(
            name=r.name,
            allocated_bytes=self.actual_bytes,
            balloon_bytes=r.memory_bytes - self.actual_bytes,
            balloon_target_bytes=r.memory_bytes - self.actual_bytes,
            active_bytes_observed=None,
            cooperative=False,
        )

    def sent(self, target_bytes: int) -> None:
        """A target reached its port."""
        self.last_sent_bytes = target_bytes
        self.sent_count += 1

    def view(self) -> VmView:
        threads = self.cpu.threads if self.cpu is not None else None
        return VmView(
            name=self.record.name,
            life=self._life,
            actual_bytes=self.actual_bytes if self.sampled else None,
            last_sent_bytes=self.last_sent_bytes,
            sent_count=self.sent_count,
            vcpu_threads=None if threads is None else dict(threads),
            port=self.port,
        )

    def failures(self) -> VmFailures:
        rejected = self.port.rejected_messages if self.port is not None else 0
        return VmFailures(self.transient_errors, self.fatal_errors, self.stalls, rejected)


__all__ = ["ManagedVm", "VmFailures", "VmLife", "VmView"]
