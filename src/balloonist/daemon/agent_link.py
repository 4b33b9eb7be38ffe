"""The host's end of one guest's balloon agent (``docs/agent-protocol.md``).

Two layers. :class:`AgentSession` is pure bookkeeping: it takes lines the guest sent,
refuses anything outside the protocol, tracks which guest pages the balloon holds, and
says what to answer. :class:`AgentPort` does the I/O: it reads the virtio-serial
socket QEMU exposes, frees the memory behind reported pages in the guest's RAM file
(with the vCPUs paused, so no page can change between its check and its hole), and
offers the daemon the same port as a virtio-balloon VM (:class:`~balloonist.daemon.
vm_ports.VmPort`), so both kinds of guest run under one policy.

Everything the guest says is hostile until checked: line length and message shape
(:mod:`balloonist.agent.protocol`), page ranges against the guest's RAM and against
what the balloon holds, sequence numbers, and message rate. The first violation cuts
the guest off for ``CUT_OFF_S``: its connection is closed, it counts as
uncooperative (the policy holds it where it is), and other guests never notice.

The balloon size the daemon sees is what the host verified, never what the guest
claims: the pages of held ranges that are holes in the RAM file now. A guest that
reuses a page behind the balloon's back only shrinks that figure.

The CPU balloon (patent claims 11 and 19) rides on the same session:
:meth:`AgentPort.set_cpu_target` sets how many vCPUs the guest should take offline,
and :attr:`AgentPort.cpu_report` is the guest's last word on which vCPUs are online
and which its balloon holds. That report is the guest's claim, not a fact the host
checked (the host cannot see inside the guest's scheduler); it is bounded, and a guest
that sends one unasked, or names more vCPUs than it has, breaks the protocol. Moving the
host's processors (:mod:`balloonist.qemu.affinity`) is the caller's: narrow the vCPU
threads' affinity after the report shows the vCPUs offline, widen it before lowering
the target.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from balloonist.agent import protocol as wire
from balloonist.driver import UnitRange, count_units
from balloonist.errors import (
    ConfigError,
    FatalBackendError,
    GuestProtocolError,
    TransientBackendError,
    Violation,
)
from balloonist.qemu.qmp import GuestStats
from balloonist.rate import TokenBucket
from balloonist.units import PAGE_SIZE_BYTES

log = logging.getLogger("balloonist.agent")

#: Messages a guest may send per second on average, and in one burst. An agent sends a
#: stats line a second and a few reports per step; a hundred times that is abuse.
MESSAGE_RATE_PER_S: Final = 100.0
MESSAGE_BURST: Final = 500
#: A guest that broke the protocol is not listened to again for this long.
CUT_OFF_S: Final = 60.0
#: An agent that has said nothing (no stats) for this long is taken for gone.
SILENCE_TIMEOUT_S: Final = 5.0
#: How long closing the port waits for a punch in flight to resume the guest, and for
#: the socket to flush; a guest that stopped reading must not hold the daemon up.
CLOSE_TIMEOUT_S: Final = 10.0
#: The only page size this host understands (x86-64 base pages).
AGENT_PAGE_SIZE_BYTES: Final = PAGE_SIZE_BYTES


class RamFile(Protocol):
    """The file behind a guest's RAM (``balloonist.qemu.reclaim`` is the real one)."""

    def check(self, ranges: Sequence[UnitRange]) -> None:
        """Raise GuestProtocolError if any range is not guest RAM."""
        ...

    def punch(self, ranges: Sequence[UnitRange], token: bytes) -> int:
        """Free the pages that still carry the token; return how many were freed."""
        ...

    def hole_pages(self, ranges: Sequence[UnitRange]) -> int:
        """How many pages of the ranges are holes (freed) right now."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class CpuReport:
    """The guest's last ``cpus`` report: its online vCPUs, and those its balloon holds.

    The guest's own numbering (Linux CPU numbers), as it said; ``received_s`` is the
    host's clock when it arrived.
    """

    online_vcpus: tuple[int, ...]
    reserved_vcpus: tuple[int, ...]
    received_s: float


class _HeldPages:
    """Disjoint page ranges the balloon holds, kept as a sorted list of intervals."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    @property
    def pages(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def ranges(self) -> list[UnitRange]:
        return [UnitRange(s, e - s) for s, e in zip(self._starts, self._ends, strict=True)]

    def add(self, r: UnitRange) -> None:
        i = bisect.bisect_left(self._starts, r.start)
        if (i > 0 and self._ends[i - 1] > r.start) or (
            i < len(self._starts) and self._starts[i] < r.end
        ):
            raise GuestProtocolError(
                f"pages {r.start}+{r.count} are already in the balloon",
                violation=Violation.BAD_PAGES,
            )
        self._starts.insert(i, r.start)
        self._ends.insert(i, r.end)

    def remove(self, r: UnitRange) -> None:
        i = bisect.bisect_right(self._starts, r.start) - 1
        if i < 0 or self._ends[i] < r.end:
            raise GuestProtocolError(
                f"pages {r.start}+{r.count} are not in the balloon", violation=Violation.BAD_PAGES
            )
        start, end = self._starts[i], self._ends[i]
        del self._starts[i], self._ends[i]
        for s, e in ((r.end, end), (start, r.start)):  # the parts that stay, kept sorted
            if e > s:
                self._starts.insert(i, s)
                self._ends.insert(i, e)

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()


@dataclass
class AgentSession:
    """What the host knows of one guest's agent; no I/O (see the module docstring)."""

    name: str
    ram: RamFile
    memory_pages: int
    #: The guest's vCPUs, as the host knows them (None: not known, not checked).
    vcpus: int | None = None
    token: bytes | None = None
    #: The session's protocol version: the lower of the agent's and the host's.
    version: int = wire.VERSION
    stats: wire.Stats | None = None
    #: When ``stats`` came: the report's stamp. Any message shows the agent alive
    #: (``last_heard_s``), but only a stats message is a new report; the daemon reads
    #: a report with the same stamp as one it has seen as that report again.
    stats_heard_s: float | None = None
    cpu_report: CpuReport | None = None
    #: The last ``cpu-refused`` or ``cpu-failed`` error of this session.
    cpu_error: wire.Error | None = None
    last_heard_s: float | None = None
    freed_pages_reported: int = 0  # by punches; the verified figure comes from the file
    violations: Counter[Violation] = field(default_factory=Counter)
    dropped_before_hello: int = 0
    cut_off_until_s: float = -math.inf
    _held: _HeldPages = field(default_factory=_HeldPages)
    _last_seq: int = -1
    _out_seq: int = 0
    _bucket: TokenBucket | None = None
    _cpu_asked: bool = False  # a cpu_target went out in this session

    # -- queries ------------------------------------------------------------------

    @property
    def registered(self) -> bool:
        return self.token is not None

    def held_ranges(self) -> list[UnitRange]:
        return self._held.ranges()

    def held_pages(self) -> int:
        return self._held.pages

    def verified_freed_pages(self) -> int:
        return self.ram.hole_pages(self._held.ranges()) if self.registered else 0

    def cut_off(self, now_s: float) -> bool:
        return now_s < self.cut_off_until_s

    def alive(self, now_s: float) -> bool:
        """Registered, not cut off, and heard from lately."""
        return (
            self.registered
            and not self.cut_off(now_s)
            and self.last_heard_s is not None
            and now_s - self.last_heard_s <= SILENCE_TIMEOUT_S
        )

    # -- input --------------------------------------------------------------------

    def decode(self, line: bytes, now_s: float) -> wire.GuestMessage:
        """Check one line's rate, shape and sequence number; raise GuestProtocolError."""
        if self._bucket is None:
            self._bucket = TokenBucket(MESSAGE_RATE_PER_S, MESSAGE_BURST, now_s)
        if not self._bucket.take(now_s):
            raise GuestProtocolError(
                f"more than {MESSAGE_RATE_PER_S:.0f} messages/s", violation=Violation.FLOOD
            )
        message = wire.decode_guest_message(line, self.version)
        if isinstance(message, wire.Hello):
            self._last_seq = -1  # a new session numbers from anything
        if message.seq <= self._last_seq:
            raise GuestProtocolError(
                f"seq {message.seq} after {self._last_seq}", violation=Violation.OUT_OF_ORDER
            )
        self._last_seq = message.seq
        return message

    def handle(self, message: wire.GuestMessage, now_s: float) -> list[wire.HostMessage]:
        """Act on a decoded message; return what to send back.

        Before ``hello`` only ``hello`` counts: what an agent sent before it saw the
        host's ``reset`` is dropped, not held against it.
        """
        if isinstance(message, wire.Hello):
            self.last_heard_s = now_s
            return self._hello(message)
        if not self.registered:
            self.dropped_before_hello += 1
            return []
        self.last_heard_s = now_s
        if isinstance(message, wire.Locked):
            return [self._ack(self._locked(message.ranges))]
        if isinstance(message, wire.Unlocked):
            for r in message.ranges:
                self._held.remove(r)
            return [self._ack(0)]
        if isinstance(message, wire.Stats):
            self.stats, self.stats_heard_s = message, now_s
        elif isinstance(message, wire.Cpus):
            self._cpus(message, now_s)
        elif isinstance(message, wire.Error):
            if message.code.startswith("cpu-"):
                self.cpu_error = message
            log.info("%s: agent reports %s: %s", self.name, message.code, message.message)
        return []

    def _cpus(self, message: wire.Cpus, now_s: float) -> None:
        if not self._cpu_asked:
            raise GuestProtocolError(
                "a cpus report the host did not ask for", violation=Violation.UNASKED
            )
        named = len(message.online) + len(message.reserved)
        if self.vcpus is not None and named > self.vcpus:
            raise GuestProtocolError(
                f"a cpus report of {named} vCPUs, the guest has {self.vcpus}",
                violation=Violation.UNASKED,
            )
        report = CpuReport(message.online, message.reserved, now_s)
        if self.cpu_report is None or (report.online_vcpus, report.reserved_vcpus) != (
            self.cpu_report.online_vcpus,
            self.cpu_report.reserved_vcpus,
        ):
            log.info(
                "%s: agent reports vCPUs online %s, reserved %s",
                self.name,
                list(message.online),
                list(message.reserved),
            )
        self.cpu_report = report

    def violated(self, exc: GuestProtocolError, now_s: float) -> None:
        """Count a violation and cut the guest off; the balloon's pages are forgotten."""
        self.violations[exc.violation] += 1
        self.cut_off_until_s = now_s + CUT_OFF_S
        self.token = None
        self._held.clear()
        self._forget_cpus()
        log.warning("%s: agent cut off for %.0f s: %s", self.name, CUT_OFF_S, exc)

    def reset(self) -> wire.Reset:
        """A new connection: forget the agent until it says hello again."""
        self.token = None
        self._held.clear()
        self._forget_cpus()
        self._out_seq += 1
        return wire.Reset(self._out_seq)

    def target(self, balloon_pages: int) -> wire.Target:
        self._out_seq += 1
        return wire.Target(self._out_seq, max(0, min(balloon_pages, self.memory_pages)))

    def cpu_target(self, reserved_vcpus: int) -> wire.CpuTarget:
        """The CPU balloon register; from now on this session may report its vCPUs."""
        if not 0 <= reserved_vcpus < wire.MAX_VCPUS:
            raise ValueError(f"a CPU target of {reserved_vcpus} vCPUs")
        self._cpu_asked = True
        self._out_seq += 1
        return wire.CpuTarget(self._out_seq, reserved_vcpus)

    def _forget_cpus(self) -> None:
        # A new session's agent reports only once asked again (and gives back vCPUs
        # nobody claims); what the old one said is history.
        self._cpu_asked = False
        self.cpu_report = None
        self.cpu_error = None

    def _hello(self, hello: wire.Hello) -> list[wire.HostMessage]:
        if hello.version not in wire.VERSIONS:
            raise GuestProtocolError(
                f"protocol version {hello.version}, host speaks 1 and 2",
                violation=Violation.UNSUPPORTED,
            )
        if hello.page_size != AGENT_PAGE_SIZE_BYTES:
            raise GuestProtocolError(
                f"page size {hello.page_size}, host uses 4096", violation=Violation.UNSUPPORTED
            )
        # A new session starts with an empty balloon: a restarted agent's old pages went
        # back to the guest, which may be using them now; a running agent answering
        # our reset reports what it still holds right after this.
        self._held.clear()
        self._forget_cpus()
        self.token = bytes.fromhex(hello.token)
        log.info("%s: agent %s registered", self.name, hello.agent)
        self.version = min(hello.version, wire.VERSION)
        self._out_seq += 1
        return [wire.Welcome(self._out_seq, self.version)]

    def _locked(self, ranges: Iterable[UnitRange]) -> int:
        ranges = list(ranges)
        self.ram.check(ranges)
        if self._held.pages + count_units(ranges) > self.memory_pages:
            raise GuestProtocolError(
                "the balloon would be larger than the guest", violation=Violation.TOO_LARGE
            )
        for r in ranges:
            self._held.add(r)
        assert self.token is not None  # decode() refuses reports before hello
        freed = self.ram.punch(ranges, self.token)
        self.freed_pages_reported += freed
        return freed

    def _ack(self, freed_pages: int) -> wire.Ack:
        # Acks carry the host's own sequence; the report they answer is implied by
        # order (the host answers every report, in order).
        self._out_seq += 1
        return wire.Ack(self._out_seq, freed_pages)


# -- I/O -------------------------------------------------------------------------------


class GuestControl(Protocol):
    """The VM's QMP, for pausing its vCPUs around a punch (``BalloonQMP`` is the real one)."""

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    def frozen(self) -> contextlib.AbstractAsyncContextManager[None]: ...

    async def vcpu_threads(self) -> dict[int, int]:
        """The VM's vCPUs: cpu-index -> host thread id (QMP ``query-cpus-fast``)."""
        ...


class AgentPort:
    """A VM managed through its balloon agent, as the daemon's ``VmPort``."""

    def __init__(
        self,
        name: str,
        socket_path: Path,
        ram: RamFile,
        memory_bytes: int,
        *,
        clock: Callable[[], float],
        control: GuestControl | None = None,
        vcpus: int | None = None,
    ) -> None:
        """``control`` pauses the guest around each punch; without it (tests) there is
        no pause, and only the page marks guard against a page reused meanwhile.

        ``vcpus`` is how many vCPUs the VM has; if not given, it is asked of ``control``
        (``query-cpus-fast``) the first time a CPU target is set.
        """
        self.name = name
        self.socket_path = socket_path
        self.memory_bytes = memory_bytes
        self._clock = clock
        self._control = control
        self._ram = ram
        if vcpus is not None and not 1 <= vcpus <= wire.MAX_VCPUS:
            raise ValueError(f"{name}: {vcpus} vCPUs")
        self.session = AgentSession(name, ram, memory_bytes // PAGE_SIZE_BYTES, vcpus=vcpus)
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._punch_task: asyncio.Task[list[wire.HostMessage]] | None = None
        self._target_pages: int | None = None
        self._cpu_target: int | None = None

    async def connect(self) -> None:
        now = self._clock()
        if self.session.cut_off(now):
            raise TransientBackendError(f"{self.name}: agent cut off for breaking the protocol")
        if self._control is not None:
            await self._control.connect()
        try:
            reader, writer = await asyncio.open_unix_connection(
                str(self.socket_path), limit=wire.MAX_LINE_BYTES
            )
        except OSError as exc:
            raise TransientBackendError(
                f"{self.name}: cannot connect to the agent port at {self.socket_path}: {exc}"
            ) from exc
        self._writer = writer
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))
        await self._send([self.session.reset()])

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
            self._reader_task = None
        if self._punch_task is not None:
            # A punch pauses the guest: let it resume the guest before QMP goes away.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._punch_task, CLOSE_TIMEOUT_S)
            self._punch_task = None
        if self._writer is not None:
            self._writer.close()
            try:
                await asyncio.wait_for(self._writer.wait_closed(), CLOSE_TIMEOUT_S)
            except TimeoutError:
                # unread data would keep the socket open forever
                self._writer.transport.abort()
            except OSError:
                pass
            self._writer = None
        if self._control is not None:
            await self._control.close()

    def release(self) -> None:
        """Close the RAM file too: the VM is no longer managed."""
        self._ram.close()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                self._violated(GuestProtocolError(f"a line over {wire.MAX_LINE_BYTES} bytes"))
                return
            except (asyncio.IncompleteReadError, OSError):
                return  # QEMU closed the socket; connect() will be retried
            now = self._clock()
            try:
                message = self.session.decode(line, now)
                if isinstance(message, wire.Locked) and self._control is not None:
                    # Shielded: cancelling the reader (close) must not leave the guest
                    # paused between QMP stop and cont.
                    self._punch_task = asyncio.get_running_loop().create_task(
                        self._frozen_handle(self._control, message, now)
                    )
                    replies = await asyncio.shield(self._punch_task)
                    self._punch_task = None
                else:
                    replies = self.session.handle(message, now)
                if isinstance(message, wire.Hello):
                    # Right with the welcome: the agent gives back vCPUs nobody claims.
                    if self._target_pages is not None:
                        replies.append(self.session.target(self._target_pages))
                    if self._cpu_target is not None:
                        replies.append(self.session.cpu_target(self._cpu_target))
            except GuestProtocolError as exc:
                self._violated(exc)
                return
            await self._send(replies)

    async def _frozen_handle(
        self, control: GuestControl, message: wire.Locked, now: float
    ) -> list[wire.HostMessage]:
        async with control.frozen():
            return self.session.handle(message, now)

    def _violated(self, exc: GuestProtocolError) -> None:
        self.session.violated(exc, self._clock())
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def _send(self, messages: Sequence[wire.HostMessage]) -> None:
        if self._writer is None or not messages:
            return
        try:
            self._writer.write(b"".join(wire.encode(m) for m in messages))
            await self._writer.drain()
        except OSError as exc:
            raise TransientBackendError(f"{self.name}: agent port: {exc}") from exc

    def _check_usable(self) -> None:
        if self._writer is None or self._reader_task is None or self._reader_task.done():
            raise TransientBackendError(f"{self.name}: agent connection lost")

    # -- VmPort ---------------------------------------------------------------------

    async def set_target(self, guest_bytes: int) -> None:
        self._check_usable()
        self._target_pages = max(0, self.memory_bytes - guest_bytes) // PAGE_SIZE_BYTES
        if self.session.registered:
            await self._send([self.session.target(self._target_pages)])

    async def set_cpu_target(self, reserved_vcpus: int) -> None:
        """Ask the guest to hold ``reserved_vcpus`` of its vCPUs offline (the CPU balloon).

        Refused with ConfigError if that is negative, or all of the guest's vCPUs or
        more (one must stay online). Sent now if the agent is registered, and again
        with every new session's ``welcome``. The guest may still refuse (say, its cpu0
        cannot go offline); it then says so in :attr:`cpu_error`, and :attr:`cpu_report`
        shows where it stays.
        """
        if reserved_vcpus < 0:
            raise ConfigError(f"{self.name}: cannot reserve {reserved_vcpus} vCPUs")
        vcpus = await self.vcpu_count()
        if reserved_vcpus >= vcpus:
            raise ConfigError(
                f"{self.name}: cannot reserve {reserved_vcpus} of its {vcpus} vCPU(s):"
                " at least one must stay online"
            )
        self._check_usable()
        self._cpu_target = reserved_vcpus
        if self.session.registered:
            await self._send([self.session.cpu_target(reserved_vcpus)])

    async def vcpu_count(self) -> int:
        """How many vCPUs the VM has: as given, or from QMP (asked once, then kept)."""
        if self.session.vcpus is None:
            count = len(await self.vcpu_threads())
            if not 1 <= count <= wire.MAX_VCPUS:
                raise FatalBackendError(f"{self.name}: QEMU reports {count} vCPUs")
            self.session.vcpus = count
        return self.session.vcpus

    async def vcpu_threads(self) -> dict[int, int]:
        """The VM's vCPU threads (cpu-index -> host thread id), asked of QMP."""
        if self._control is None:
            raise FatalBackendError(f"{self.name}: no QMP to ask for its vCPU threads")
        return await self._control.vcpu_threads()

    @property
    def cpu_report(self) -> CpuReport | None:
        """The guest's last CPU report in this session (None before one)."""
        return self.session.cpu_report

    @property
    def cpu_error(self) -> wire.Error | None:
        """The guest's last CPU refusal or failure in this session (None before one)."""
        return self.session.cpu_error

    async def actual_bytes(self) -> int:
        self._check_usable()
        return self.memory_bytes - self.session.verified_freed_pages() * PAGE_SIZE_BYTES

    async def enable_stats(self, interval_s: int) -> None:
        del interval_s  # the agent sends stats on its own, once a second

    async def guest_stats(self) -> GuestStats:
        """The agent's figures in virtio-balloon's terms, for the daemon's demand rule.

        Refaults (pages the guest evicted and needed again) stand in for major faults:
        they are the sharper signal of a guest short of memory.
        """
        self._check_usable()
        s = self.session.stats
        if s is None or not self.session.alive(self._clock()):
            return GuestStats(last_update_s=0)
        return GuestStats(
            last_update_s=int(self.session.stats_heard_s or 0),
            total_bytes=s.mem_total_bytes,
            available_bytes=s.mem_available_bytes,
            major_faults=s.refaults,
            swap_in_pages=s.swap_in_pages,
            swap_out_pages=s.swap_out_pages,
            stall_s=_stall_s(s.psi_some_total_us),
            swap_used_bytes=s.swap_used_bytes,
        )

    @property
    def cooperative(self) -> bool:
        return self.session.alive(self._clock())

    @property
    def rejected_messages(self) -> int:
        return sum(self.session.violations.values())

    @property
    def cpu_balloon(self) -> AgentPort:
        return self


def _stall_s(psi_some_total_us: int | None) -> float | None:
    """The agent's stall total in seconds; None from a version-1 agent or without PSI."""
    if psi_some_total_us is None or psi_some_total_us < 0:
        return None
    return psi_some_total_us / 1e6


__all__ = [
    "CUT_OFF_S",
    "MESSAGE_BURST",
    "MESSAGE_RATE_PER_S",
    "SILENCE_TIMEOUT_S",
    "AgentPort",
    "AgentSession",
    "CpuReport",
    "GuestControl",
    "RamFile",
]
