"""The agent against the host's own bookkeeping (``daemon.agent_link.AgentSession``):
through inflation, deflation, a daemon restart that adopts the balloon in paced steps,
and pressure that gives pages back in the middle of that, the host never sees a
protocol violation and ends up holding exactly the pages the guest has pinned. The
same for the CPU balloon: the host's report follows the guest's vCPUs."""

from __future__ import annotations

from pathlib import Path

import pytest

from balloonist.agent import protocol as proto
from balloonist.agent.cpus import CpuBalloon, CpuHotplug
from balloonist.agent.hostlink import Link
from balloonist.agent.main import MIB, Agent, AgentConfig
from balloonist.daemon.agent_link import AgentSession
from balloonist.rate import AdaptiveRate, RateLimits
from tests.fakes import FakeRam

from .fakes import PAGE, FakeClock, FakeHost, FakeKernel, FakePressure, FakeSysfs, Ports

TOKEN = "0f1e2d3c4b5a6978"
CONFIG = AgentConfig(step_s=0.25, floor_bytes=256 * MIB, page_size_bytes=PAGE)
MEMORY_PAGES = 1 << 22
MAX_STEPS = 400


class SessionHost:
    """One daemon connection: the real session logic behind a socketpair."""

    def __init__(self, events: list[str], clock: FakeClock) -> None:
        self.wire = FakeHost(events, reset=False)
        self.session = AgentSession("guest", FakeRam(MEMORY_PAGES, TOKEN), MEMORY_PAGES)
        self.clock = clock
        self.target_pages: int | None = None
        self.cpu_target: int | None = None
        self.wire.send(self.session.reset())

    def pump(self) -> None:
        for line in self.wire.receive_lines():
            now = self.clock()
            message = self.session.decode(line, now)  # raises on any violation
            replies = self.session.handle(message, now)
            if isinstance(message, proto.Hello) and self.target_pages is not None:
                replies.append(self.session.target(self.target_pages))
            if isinstance(message, proto.Hello) and self.cpu_target is not None:
                replies.append(self.session.cpu_target(self.cpu_target))
            if not self.wire.eof:  # the agent may have closed after its last report
                self.wire.send(*replies)

    def set_target(self, pages: int) -> None:
        self.target_pages = pages
        if self.session.registered:
            self.wire.send(self.session.target(pages))

    def set_cpu_target(self, vcpus: int) -> None:
        self.cpu_target = vcpus
        if self.session.registered:
            self.wire.send(self.session.cpu_target(vcpus))

    def held(self) -> set[int]:
        return {p for r in self.session.held_ranges() for p in range(r.start, r.end)}


def test_host_session_and_guest_agree_through_a_daemon_restart_and_pressure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events: list[str] = []
    clock, ports, pressure = FakeClock(), Ports(), FakePressure()
    kernel = FakeKernel(events)
    kernel.free = list(range(2 * 50_000, 0, -2))  # every page its own range
    agent = Agent(
        ports,
        kernel,
        pressure,
        clock,
        TOKEN,
        CONFIG,
        rate=AdaptiveRate(RateLimits(min_units=1024, max_units=4096, increase_units=1024)),
    )
    host = SessionHost(events, clock)
    ports.queue.append(host.wire)

    def link() -> Link:  # a function, so mypy does not narrow it across steps
        return agent.link

    def step() -> None:
        agent.run_once()
        host.pump()
        clock.now_s += CONFIG.step_s

    def run_until(condition: object) -> None:
        assert callable(condition)
        for _ in range(MAX_STEPS):
            if condition():
                return
            step()
        raise AssertionError("not reached")

    host.set_target(12_000)
    run_until(lambda: agent.driver.size_units == 12_000 and host.held() == kernel.held)
    host.set_target(9_000)
    run_until(lambda: agent.driver.size_units == 9_000 and host.held() == kernel.held)

    # The daemon restarts: a new connection, a session that knows nothing. A budget of a
    # message or two a step from now on, so adopting the old balloon takes many steps
    # and pressure can give back pages the new session has not heard of yet.
    monkeypatch.setattr(agent.message_budget, "burst", 6)
    monkeypatch.setattr(agent.message_budget, "rate_per_s", 2.0)
    host.wire.close()
    step()
    assert link() is Link.DOWN
    host = SessionHost(events, clock)
    ports.queue.append(host.wire)
    clock.now_s += CONFIG.retry_s
    step()  # hello, hello; the host welcomes both
    assert len(host.held()) == 0
    # Pressure as the session starts: the guest needs 5 000 pages back.
    short_pages = 5_000
    pressure.available = lambda: 256 * MIB - (short_pages - (9_000 - len(kernel.held))) * PAGE
    step()
    assert link() is Link.UP
    run_until(lambda: host.held() == kernel.held)
    assert len(kernel.held) == 4_000  # at the floor exactly
    assert agent.counters["unadopted_pages"] > 0  # went back before the host heard of them
    assert len(host.held()) > 0
    assert host.session.violations == {}
    # and the new daemon can steer it as usual
    pressure.available = None
    host.set_target(6_000)
    run_until(lambda: agent.driver.size_units == 6_000 and host.held() == kernel.held)
    # Shutdown reports what its budget (here a couple of messages) allows; the host
    # keeps the rest as held, and counts only what is still a hole.
    unreported_before = agent.counters["unreported_pages"]
    agent.close()
    host.pump()
    assert kernel.held == set()
    assert len(host.held()) == agent.counters["unreported_pages"] - unreported_before > 0
    assert host.session.violations == {}


def test_the_hosts_cpu_report_follows_the_guest_through_a_daemon_restart(tmp_path: Path) -> None:
    events: list[str] = []
    clock, ports = FakeClock(), Ports()
    sysfs = FakeSysfs(tmp_path / "cpu", 4)
    agent = Agent(
        ports,
        FakeKernel(events),
        FakePressure(),
        clock,
        TOKEN,
        CONFIG,
        cpus=CpuBalloon(CpuHotplug(sysfs.root)),
    )
    host = SessionHost(events, clock)
    host.session.vcpus = 4
    ports.queue.append(host.wire)

    def step() -> None:
        agent.run_once()
        host.pump()
        clock.now_s += CONFIG.step_s

    def reserved() -> tuple[int, ...] | None:
        report = host.session.cpu_report
        return None if report is None else report.reserved_vcpus

    host.set_cpu_target(3)  # sent with the welcome
    for _ in range(MAX_STEPS):
        if reserved() == (1, 2, 3):
            break
        step()
    assert host.session.cpu_report is not None
    assert host.session.cpu_report.online_vcpus == (0,)
    assert sysfs.offline() == {1, 2, 3}
    # The daemon restarts and claims the same CPU balloon with its welcome.
    host.wire.close()
    step()
    host = SessionHost(events, clock)
    host.session.vcpus = 4
    host.cpu_target = 3
    ports.queue.append(host.wire)
    clock.now_s += CONFIG.retry_s
    for _ in range(8):
        step()
    assert reserved() == (1, 2, 3) and sysfs.offline() == {1, 2, 3}
    host.set_cpu_target(1)
    for _ in range(4):
        step()
    assert reserved() == (3,)
    agent.close()
    host.pump()
    assert reserved() == () and sysfs.offline() == set()
    assert host.session.violations == {}
