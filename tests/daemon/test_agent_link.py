"""The host's end of the agent protocol: what a guest may and may not make it do.

No QEMU: a fake RAM file records what would be freed, and for the port tests a fake
guest speaks over a real unix socket, as QEMU's chardev would carry it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from balloonist.agent import protocol as wire
from balloonist.daemon.agent_link import (
    CUT_OFF_S,
    MESSAGE_BURST,
    SILENCE_TIMEOUT_S,
    AgentPort,
    AgentSession,
    CpuReport,
    GuestControl,
)
from balloonist.daemon.service import Daemon, DaemonConfig
from balloonist.driver import UnitRange
from balloonist.errors import (
    ConfigError,
    FatalBackendError,
    GuestProtocolError,
    TransientBackendError,
    Violation,
)
from balloonist.host import HostMemInfo
from balloonist.qemu.launcher import StateDir, VMRecord
from balloonist.units import GIB, MIB, PAGE_SIZE_BYTES
from tests.fakes import FakeRam
from tests.waiting import until

#: Everything here happens on one machine in milliseconds; this only bounds a hang.
DEADLINE_S = 5.0
TOKEN = "00112233aabbccdd"
RAM_PAGES = 64 * MIB // PAGE_SIZE_BYTES


def hello(seq: int = 0) -> bytes:
    return wire.encode(wire.Hello(seq, 1, "test", 4096, TOKEN))


def locked(seq: int, *ranges: tuple[int, int]) -> bytes:
    return wire.encode(wire.Locked(seq, tuple(UnitRange(s, c) for s, c in ranges)))


def unlocked(seq: int, *ranges: tuple[int, int]) -> bytes:
    return wire.encode(wire.Unlocked(seq, tuple(UnitRange(s, c) for s, c in ranges)))


def cpus(seq: int, online: tuple[int, ...], reserved: tuple[int, ...]) -> bytes:
    return wire.encode(wire.Cpus(seq, online, reserved))


def feed(session: AgentSession, *lines: bytes, now: float = 0.0) -> list[wire.HostMessage]:
    replies = []
    for line in lines:
        replies += session.handle(session.decode(line, now), now)
    return replies


def test_a_session_registers_locks_and_unlocks_and_the_size_is_what_the_file_shows() -> None:
    ram = FakeRam(RAM_PAGES, TOKEN, reused={15})
    session = AgentSession("g", ram, RAM_PAGES)
    replies = feed(session, hello(), locked(1, (10, 6), (100, 4)))
    assert isinstance(replies[0], wire.Welcome)
    assert replies[1] == wire.Ack(replies[0].seq + 1, 9)  # page 15 was reused: not freed
    assert session.held_pages() == 10
    assert session.verified_freed_pages() == 9
    ram.holes.discard(100)  # the guest touched a freed page: the file has it again
    assert session.verified_freed_pages() == 8
    feed(session, unlocked(2, (12, 2)))
    assert session.held_ranges() == [UnitRange(10, 2), UnitRange(14, 2), UnitRange(100, 4)]


@pytest.mark.parametrize(
    ("lines", "why", "violation"),
    [
        ([hello(), locked(1, (0, 1)), locked(1, (5, 1))], "seq", Violation.OUT_OF_ORDER),
        (
            [hello(), locked(1, (0, 4)), locked(2, (3, 1))],
            "already in the balloon",
            Violation.BAD_PAGES,
        ),
        ([hello(), unlocked(1, (0, 1))], "not in the balloon", Violation.BAD_PAGES),
        (
            [hello(), locked(1, (0, 4)), unlocked(2, (2, 4))],
            "not in the balloon",
            Violation.BAD_PAGES,
        ),
        ([hello(), locked(1, (RAM_PAGES - 1, 2))], "not guest RAM", Violation.BAD_PAGES),
        (
            [hello(), locked(1, (0, RAM_PAGES)), locked(2, (RAM_PAGES + 1, 1))],
            "not guest RAM",
            Violation.BAD_PAGES,
        ),
        ([wire.encode(wire.Hello(0, 3, "x", 4096, TOKEN))], "version", Violation.UNSUPPORTED),
        (
            [wire.encode(wire.Hello(0, 1, "x", 65536, TOKEN))],
            "page size",
            Violation.UNSUPPORTED,
        ),
        ([hello(), b'{"type":"locked","seq":1}\n'], "missing ranges", Violation.MALFORMED),
    ],
)
def test_violations_are_refused(lines: list[bytes], why: str, violation: Violation) -> None:
    session = AgentSession("g", FakeRam(RAM_PAGES, TOKEN), RAM_PAGES)
    with pytest.raises(GuestProtocolError, match=why) as caught:
        feed(session, *lines)
    assert caught.value.violation is violation  # a counter of its own, not a parsed message


def test_a_balloon_larger_than_the_guest_is_refused() -> None:
    session = AgentSession("g", FakeRam(1 << 30, TOKEN), RAM_PAGES)
    with pytest.raises(GuestProtocolError, match="larger than the guest"):
        feed(session, hello(), locked(1, (0, RAM_PAGES)), locked(2, (RAM_PAGES, 1)))


def test_a_flood_is_a_violation_and_a_violation_cuts_the_guest_off() -> None:
    session = AgentSession("g", FakeRam(RAM_PAGES, TOKEN), RAM_PAGES)
    feed(session, hello(), locked(1, (0, 8)))
    with pytest.raises(GuestProtocolError, match="messages/s") as caught:
        for seq in range(2, MESSAGE_BURST + 10):  # all at the same instant
            feed(session, wire.encode(wire.Error(seq, "pressure", "x")))
    session.violated(caught.value, now_s=0.0)
    assert session.violations == {Violation.FLOOD: 1}
    assert session.violations and not session.registered and session.held_pages() == 0
    assert session.cut_off(CUT_OFF_S - 1) and not session.cut_off(CUT_OFF_S + 1)


def test_a_new_hello_forgets_the_old_balloon() -> None:
    session = AgentSession("g", FakeRam(RAM_PAGES, TOKEN), RAM_PAGES)
    feed(session, hello(), locked(1, (0, 8)), hello(0))
    assert session.registered and session.held_pages() == 0


def test_after_a_reset_only_hello_counts_and_the_agent_can_report_its_balloon_again() -> None:
    session = AgentSession("g", FakeRam(RAM_PAGES, TOKEN), RAM_PAGES)
    feed(session, hello(), locked(1, (0, 8)))
    session.reset()  # the host reconnected
    assert feed(session, locked(2, (8, 8)), unlocked(3, (0, 8))) == []  # in flight: dropped
    assert session.dropped_before_hello == 2 and not session.violations
    feed(session, hello(4), locked(5, (0, 8)))  # the agent answers the reset
    assert session.held_ranges() == [UnitRange(0, 8)]


def test_an_agent_is_alive_only_while_it_keeps_talking() -> None:
    session = AgentSession("g", FakeRam(RAM_PAGES, TOKEN), RAM_PAGES)
    assert not session.alive(0.0)
    feed(session, hello(), now=10.0)
    assert session.alive(10.0 + SILENCE_TIMEOUT_S)
    assert not session.alive(10.0 + SILENCE_TIMEOUT_S + 1)


# -- the CPU balloon ---------------------------------------------------------------


def test_a_cpu_report_is_kept_once_the_host_has_asked_for_one() -> None:
    session = AgentSession("g", FakeRam(RAM_PAGES, TOKEN), RAM_PAGES, vcpus=4)
    feed(session, hello(), now=7.0)
    assert session.cpu_target(2) == wire.CpuTarget(2, 2)
    feed(session, cpus(1, (0, 1), (2, 3)), now=7.0)
    assert session.cpu_report == CpuReport((0, 1), (2, 3), 7.0)
    feed(session, wire.encode(wire.Error(2, "cpu-refused", "cpu_target 4 refused")), now=7.0)
    assert session.cpu_error == wire.Error(2, "cpu-refused", "cpu_target 4 refused")
    feed(session, wire.encode(wire.Error(3, "pressure", "guard on")), now=7.0)  # not a CPU one
    assert session.cpu_error is not None and session.cpu_error.seq == 2
    # A new session knows nothing of the old one's vCPUs, and has not asked yet.
    feed(session, hello(10), now=7.0)
    assert session.cpu_report is None and session.cpu_error is None
    with pytest.raises(GuestProtocolError, match="did not ask"):
        feed(session, cpus(11, (0, 1, 2, 3), ()), now=7.0)


@pytest.mark.parametrize(
    ("lines", "why"),
    [
        ([hello(), cpus(1, (0,), (1,))], "did not ask"),
        ([hello(), "ask", cpus(1, (0, 1, 2), (3, 4))], "5 vCPUs, the guest has 4"),
        ([hello(), b'{"type":"cpus","seq":1,"online":[0,1],"reserved":[1]}\n'], "both"),
    ],
)
def test_cpu_reports_outside_the_protocol_are_violations(lines: list[object], why: str) -> None:
    session = AgentSession("g", FakeRam(RAM_PAGES, TOKEN), RAM_PAGES, vcpus=4)
    with pytest.raises(GuestProtocolError, match=why):
        for line in lines:
            if line == "ask":
                session.cpu_target(1)
            else:
                assert isinstance(line, bytes)
                feed(session, line)


def test_a_reset_forgets_that_the_host_asked() -> None:
    session = AgentSession("g", FakeRam(RAM_PAGES, TOKEN), RAM_PAGES, vcpus=4)
    feed(session, hello())
    session.cpu_target(1)
    session.reset()
    feed(session, cpus(1, (0, 1, 2), (3,)))  # in flight from before: dropped
    assert session.dropped_before_hello == 1 and session.cpu_report is None
    feed(session, hello(2))
    with pytest.raises(GuestProtocolError, match="did not ask"):
        feed(session, cpus(3, (0, 1, 2), (3,)))


# -- versions ------------------------------------------------------------------------


def stats(seq: int, *, total_us: int | None = None, swap: int | None = None) -> wire.Stats:
    return wire.Stats(seq, 0, 64, GIB, GIB // 2, 3.0, 0.5, 7, 1, 2, total_us, swap)


@pytest.mark.parametrize("version", [1, 2])
def test_a_session_runs_at_the_agents_version(version: int) -> None:
    session = AgentSession("g", FakeRam(RAM_PAGES, TOKEN), RAM_PAGES)
    (welcome,) = feed(session, wire.encode(wire.Hello(0, version, "test", 4096, TOKEN)))
    assert welcome == wire.Welcome(1, version) and session.version == version
    sent = stats(1, total_us=2_500_000, swap=8 * MIB) if version == 2 else stats(1)
    feed(session, wire.encode(sent, version))
    assert session.stats == sent


def test_a_version_1_agent_cannot_send_version_2_stats_nor_the_reverse() -> None:
    old, new = (AgentSession("g", FakeRam(RAM_PAGES, TOKEN), RAM_PAGES) for _ in range(2))
    feed(old, hello())
    with pytest.raises(GuestProtocolError, match="unknown psi_some_total_us"):
        feed(old, wire.encode(stats(1, total_us=1, swap=0), 2))
    feed(new, wire.encode(wire.Hello(0, 2, "test", 4096, TOKEN)))
    with pytest.raises(GuestProtocolError, match="missing psi_some_total_us"):
        feed(new, wire.encode(stats(1), 1))


# -- over a socket -----------------------------------------------------------------


class FakeGuest:
    """QEMU's side of the chardev socket, with a scripted guest behind it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.received: list[wire.HostMessage] = []
        self.writer: asyncio.StreamWriter | None = None
        self.connected = asyncio.Event()
        self.closed = asyncio.Event()

    async def serve(self) -> asyncio.Server:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writer = writer
            self.connected.set()
            while line := await reader.readline():
                self.received.append(wire.decode_host_message(line))
            self.closed.set()

        return await asyncio.start_unix_server(on_connect, str(self.path))

    async def send(self, *lines: bytes) -> None:
        assert self.writer is not None
        self.writer.write(b"".join(lines))
        await self.writer.drain()


@contextlib.asynccontextmanager
async def guest_and_port(
    tmp_path: Path,
    name: str,
    control: GuestControl | None = None,
    clock: Callable[[], float] | None = None,
) -> AsyncIterator[tuple[FakeGuest, AgentPort]]:
    guest = FakeGuest(tmp_path / f"{name}.sock")
    server = await guest.serve()
    port = AgentPort(
        name,
        guest.path,
        FakeRam(RAM_PAGES, TOKEN),
        64 * MIB,
        clock=clock or asyncio.get_running_loop().time,
        control=control,
    )
    try:
        await port.connect()
        await guest.connected.wait()
        yield guest, port
    finally:
        await port.close()
        server.close()


def test_the_port_follows_the_target_and_reports_verified_sizes(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with guest_and_port(tmp_path, "g") as (guest, port):
            await port.set_target(48 * MIB)  # before hello: sent once the agent registers
            await until(
                lambda: guest.received == [wire.Reset(1)],
                DEADLINE_S,
                "guest.received == [wire.Reset(1)]",
            )
            await guest.send(hello())
            await until(
                lambda: any(isinstance(m, wire.Target) for m in guest.received),
                DEADLINE_S,
                "any(isinstance(m, wire.Target) for m in guest.received)",
            )
            target = next(m for m in guest.received if isinstance(m, wire.Target))
            assert target.balloon_pages == 16 * MIB // PAGE_SIZE_BYTES
            await guest.send(locked(1, (0, target.balloon_pages)))
            await until(
                lambda: isinstance(guest.received[-1], wire.Ack),
                DEADLINE_S,
                "isinstance(guest.received[-1], wire.Ack)",
            )
            assert await port.actual_bytes() == 48 * MIB

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("version", "total_us", "stall_s", "swap"),
    [(2, 2_500_000, 2.5, 8 * MIB), (2, -1, None, 0), (1, None, None, None)],
)
def test_the_port_gives_the_agents_stall_and_swap_where_it_has_them(
    tmp_path: Path, version: int, total_us: int | None, stall_s: float | None, swap: int | None
) -> None:
    async def scenario() -> None:
        async with guest_and_port(tmp_path, "g") as (guest, port):
            await guest.send(wire.encode(wire.Hello(0, version, "test", 4096, TOKEN)))
            await guest.send(wire.encode(stats(1, total_us=total_us, swap=swap), version))
            await until(lambda: port.session.stats is not None, DEADLINE_S, "port.session.stats")
            figures = await port.guest_stats()
            assert (figures.stall_s, figures.swap_used_bytes) == (stall_s, swap)
            assert figures.major_faults == 7

    asyncio.run(scenario())


def test_a_reports_stamp_is_when_its_stats_came_not_the_agents_last_message(
    tmp_path: Path,
) -> None:
    # The daemon reads a report with a stamp it has seen as the same report, made at
    # the balloon's size then: a message that is not stats must not make it new.
    now_s = [10.3]

    async def scenario() -> None:
        async with guest_and_port(tmp_path, "g", clock=lambda: now_s[0]) as (guest, port):
            await guest.send(hello(), wire.encode(stats(1), 1))
            await until(lambda: port.session.stats is not None, DEADLINE_S, "port.session.stats")
            now_s[0] = 12.5
            await guest.send(wire.encode(wire.Error(2, "pressure", "not a report"), 1))
            await until(lambda: port.session.last_heard_s == 12.5, DEADLINE_S, "the error is heard")
            assert (await port.guest_stats()).last_update_s == 10
            now_s[0] = 13.2
            await guest.send(wire.encode(stats(3), 1))
            await until(lambda: port.session.last_heard_s == 13.2, DEADLINE_S, "stats heard")
            assert (await port.guest_stats()).last_update_s == 13

    asyncio.run(scenario())


def test_a_hostile_guest_is_cut_off_and_the_other_keeps_being_served(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with (
            guest_and_port(tmp_path, "bad") as (bad, bad_port),
            guest_and_port(tmp_path, "good") as (good, good_port),
        ):
            await bad.send(hello(), b"x" * (wire.MAX_LINE_BYTES + 10) + b"\n")
            await good.send(hello(), locked(1, (0, 256)))
            await asyncio.wait_for(bad.closed.wait(), 5.0)
            assert sum(bad_port.session.violations.values()) == 1
            with pytest.raises(TransientBackendError):
                await bad_port.actual_bytes()
            with pytest.raises(TransientBackendError, match="cut off"):
                await bad_port.connect()
            await until(
                lambda: good_port.session.held_pages() == 256,
                DEADLINE_S,
                "good_port.session.held_pages() == 256",
            )
            assert await good_port.actual_bytes() == 64 * MIB - 256 * PAGE_SIZE_BYTES

    asyncio.run(scenario())


class ThreadedGuest:
    """QEMU's end of an agent socket for a daemon that runs its own event loop."""

    def __init__(self, path: Path) -> None:
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(1)
        self.conn: socket.socket | None = None
        self.accepted = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.conn = self.server.accept()[0]
        self.accepted.set()

    def send(self, *lines: bytes) -> None:
        assert self.accepted.wait(5.0) and self.conn is not None
        self.conn.sendall(b"".join(lines))

    def received(self) -> list[wire.HostMessage]:
        """Everything the host has sent so far."""
        assert self.conn is not None
        self.conn.setblocking(False)
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := self.conn.recv(1 << 16):
                data += chunk
        return [wire.decode_host_message(line + b"\n") for line in data.split(b"\n") if line]

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.server.close()


def daemon_over(tmp_path: Path, names: Sequence[str]) -> tuple[Daemon, dict[str, AgentPort]]:
    """A daemon over agent VMs of 64 MiB whose ports are ``AgentPort``s on fake RAM."""
    state = StateDir(tmp_path / "state")
    ports = {}
    for name in names:
        state.save(VMRecord(name, 64 * MIB, 0, 64 * MIB, 1000, "/none", None, None, None, False))
        ports[name] = AgentPort(
            name,
            tmp_path / f"{name}.sock",
            FakeRam(RAM_PAGES, TOKEN),
            64 * MIB,
            clock=time.monotonic,
        )
    config = DaemonConfig.model_validate({"daemon": {"budget": "96MiB"}})
    daemon = Daemon(
        config,
        state,
        meminfo=lambda: HostMemInfo(8 * GIB, 6 * GIB, 0, 0),
        connector=lambda record: ports[record.name],
    )
    return daemon, ports


def test_between_periods_the_daemon_keeps_reading_its_agents(tmp_path: Path) -> None:
    """A report that arrives while the daemon waits for its next period is handled then."""
    guest = ThreadedGuest(tmp_path / "g.sock")
    daemon, ports = daemon_over(tmp_path, ["g"])
    try:
        daemon.step()  # connects (and sends reset)
        guest.send(hello() + locked(1, (0, 256)))
        deadline = time.monotonic() + 5.0
        while ports["g"].session.held_pages() != 256 and time.monotonic() < deadline:
            daemon.idle(0.1)  # no step: only the wait between periods runs
        assert ports["g"].session.held_pages() == 256
    finally:
        daemon.close()
        guest.close()


def test_a_hostile_agent_is_cut_off_and_the_daemon_serves_the_others(tmp_path: Path) -> None:
    guests = {name: ThreadedGuest(tmp_path / f"{name}.sock") for name in ("bad", "good")}
    daemon, ports = daemon_over(tmp_path, list(guests))
    try:
        daemon.step()
        guests["good"].send(hello())
        guests["bad"].send(hello(), locked(1, (RAM_PAGES + 10, 1)))  # not its RAM
        for _ in range(5):
            daemon.step()
            daemon.idle(0.1)
        assert ports["bad"].session.violations and not ports["bad"].cooperative
        assert "bad" in daemon.hv.managed()  # held where it is, not dropped
        # two 64 MiB guests in 96 MiB: the policy balloons the good one, and tells it so
        targets = [m for m in guests["good"].received() if isinstance(m, wire.Target)]
        assert targets and targets[-1].balloon_pages > 0
        assert ports["good"].cooperative
    finally:
        daemon.close()
        for guest in guests.values():
            guest.close()


@dataclass
class FakeControl:
    """The VM's QMP as AgentPort needs it: no pause, and a fixed list of vCPU threads."""

    threads: dict[int, int] = field(default_factory=lambda: {0: 101, 1: 102})
    asked: int = 0

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    @contextlib.asynccontextmanager
    async def frozen(self) -> AsyncIterator[None]:
        yield

    async def vcpu_threads(self) -> dict[int, int]:
        self.asked += 1
        return self.threads


def test_the_port_sets_the_cpu_target_and_keeps_the_guests_report(tmp_path: Path) -> None:
    async def scenario() -> None:
        guest = FakeGuest(tmp_path / "g.sock")
        server = await guest.serve()
        control = FakeControl()
        port = AgentPort(
            "g",
            guest.path,
            FakeRam(RAM_PAGES, TOKEN),
            64 * MIB,
            clock=time.monotonic,
            control=control,
        )
        try:
            await port.connect()
            await guest.connected.wait()
            await port.set_cpu_target(1)  # before hello: sent with the welcome
            assert await port.vcpu_count() == 2 and control.asked == 1  # asked once, kept
            await guest.send(hello())
            await until(
                lambda: any(isinstance(m, wire.CpuTarget) for m in guest.received),
                DEADLINE_S,
                "any(isinstance(m, wire.CpuTarget) for m in guest.received)",
            )
            assert [type(m) for m in guest.received] == [wire.Reset, wire.Welcome, wire.CpuTarget]
            assert guest.received[-1] == wire.CpuTarget(guest.received[-1].seq, 1)
            assert port.cpu_report is None
            await guest.send(cpus(1, (0,), (1,)))
            await until(
                lambda: port.cpu_report is not None, DEADLINE_S, "port.cpu_report is not None"
            )
            assert port.cpu_report is not None
            assert (port.cpu_report.online_vcpus, port.cpu_report.reserved_vcpus) == ((0,), (1,))
            await port.set_cpu_target(0)  # registered: sent at once
            await until(
                lambda: guest.received[-1] == wire.CpuTarget(guest.received[-1].seq, 0),
                DEADLINE_S,
                "guest.received[-1] == wire.CpuTarget(guest.received[-1].seq, 0)",
            )
            await guest.send(wire.encode(wire.Error(2, "cpu-failed", "cpu1: busy")))
            await until(
                lambda: port.cpu_error is not None, DEADLINE_S, "port.cpu_error is not None"
            )
            assert port.cpu_error is not None and port.cpu_error.message == "cpu1: busy"
            assert not port.session.violations
        finally:
            await port.close()
            server.close()

    asyncio.run(scenario())


@dataclass
class SlowControl(FakeControl):
    """A QMP whose ``stop`` and ``cont`` take a while, as on a loaded host."""

    paused: bool = False
    in_punch: asyncio.Event | None = None

    @contextlib.asynccontextmanager
    async def frozen(self) -> AsyncIterator[None]:
        await asyncio.sleep(0.05)
        self.paused = True
        assert self.in_punch is not None
        self.in_punch.set()
        try:
            yield
        finally:
            await asyncio.sleep(0.2)  # cont
            self.paused = False


def test_closing_the_port_during_a_punch_still_resumes_the_guest(tmp_path: Path) -> None:
    async def scenario() -> None:
        control = SlowControl(in_punch=asyncio.Event())
        assert control.in_punch is not None
        # leaving the block closes the port, which cancels the reader between stop and cont
        async with guest_and_port(tmp_path, "g", control) as (guest, _port):
            await guest.send(hello(), locked(1, (0, 256)))
            await asyncio.wait_for(control.in_punch.wait(), 5.0)
            assert control.paused
        assert not control.paused

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("reserved", "why"),
    [
        (2, "g: cannot reserve 2 of its 2 vCPU(s): at least one must stay online"),
        (3, "g: cannot reserve 3 of its 2 vCPU(s)"),
        (-1, "g: cannot reserve -1 vCPUs"),
    ],
)
def test_the_port_refuses_a_cpu_target_that_leaves_no_vcpu(
    tmp_path: Path, reserved: int, why: str
) -> None:
    async def scenario() -> None:
        async with guest_and_port(tmp_path, "g") as (guest, port):
            port.session.vcpus = 2
            await guest.send(hello())
            await until(lambda: port.session.registered, DEADLINE_S)
            with pytest.raises(ConfigError) as refused:
                await port.set_cpu_target(reserved)
            assert str(refused.value).startswith(why) and "\n" not in str(refused.value)
            await asyncio.sleep(0.05)
            assert not any(isinstance(m, wire.CpuTarget) for m in guest.received)

    asyncio.run(scenario())


def test_without_a_vcpu_count_or_qmp_the_cpu_target_is_a_backend_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with guest_and_port(tmp_path, "g") as (_guest, port):
            with pytest.raises(FatalBackendError, match="g: no QMP to ask for its vCPU threads"):
                await port.set_cpu_target(1)

    asyncio.run(scenario())


def test_a_vcpu_count_given_to_the_port_needs_no_qmp(tmp_path: Path) -> None:
    async def scenario() -> None:
        control = FakeControl()
        port = AgentPort(
            "g",
            tmp_path / "none.sock",
            FakeRam(RAM_PAGES, TOKEN),
            64 * MIB,
            clock=time.monotonic,
            control=control,
            vcpus=3,
        )
        assert await port.vcpu_count() == 3 and control.asked == 0

    asyncio.run(scenario())
