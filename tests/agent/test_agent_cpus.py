"""The agent's CPU balloon against a fake host and a fake sysfs tree: reports only once
the host has claimed the balloon, paced inflation, refusals that move nothing, giving
back on deflation, on shutdown and when no host claims the balloon after a reset or a
lost link, and a kernel that refuses a write."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from balloonist.agent import protocol as proto
from balloonist.agent.cpus import CpuBalloon, CpuHotplug
from balloonist.agent.cpuside import CPU_MAX_PER_STEP
from balloonist.agent.hostlink import Link
from balloonist.agent.main import Agent, AgentConfig
from balloonist.rate import AdaptiveRate, RateLimits

from .fakes import (
    PAGE,
    FakeClock,
    FakeHost,
    FakeKernel,
    FakePressure,
    FakeSysfs,
    FlakyHotplug,
    Ports,
    Stepping,
)

TOKEN = "00112233aabbccdd"
MIB = 1 << 20
#: Steps of 0.25 s add up exactly in binary floating point.
CONFIG = AgentConfig(step_s=0.25, stats_s=1.0, floor_bytes=256 * MIB, page_size_bytes=PAGE)


@dataclass
class Rig(Stepping):
    root: Path
    vcpus: int = 4
    events: list[str] = field(default_factory=list)
    clock: FakeClock = field(default_factory=FakeClock)
    ports: Ports = field(default_factory=Ports)

    def __post_init__(self) -> None:
        self.sysfs = FakeSysfs(self.root, self.vcpus)
        self.hotplug = FlakyHotplug(self.root)
        self.agent = Agent(
            self.ports,
            FakeKernel(self.events),
            FakePressure(),
            self.clock,
            TOKEN,
            CONFIG,
            rate=AdaptiveRate(RateLimits(min_units=64, max_units=1024, increase_units=128)),
            cpus=CpuBalloon(self.hotplug),
        )

    def session(self) -> FakeHost:
        host = FakeHost(self.events)
        self.ports.queue.append(host)
        self.step()
        host.send(proto.Welcome(seq=1, version=proto.VERSION))
        host.send(proto.Welcome(seq=2, version=proto.VERSION))
        self.step()
        assert self.link() is Link.UP
        host.receive()
        return host

    def held(self) -> tuple[int, ...]:
        assert self.agent.cpu.balloon is not None
        return self.agent.cpu.balloon.held


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path / "cpu")


def reports(messages: list[proto.GuestMessage]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [(m.online, m.reserved) for m in messages if isinstance(m, proto.Cpus)]


def errors(messages: list[proto.GuestMessage]) -> list[proto.Error]:
    return [m for m in messages if isinstance(m, proto.Error)]


def test_without_a_cpu_target_the_agent_never_speaks_of_cpus(rig: Rig) -> None:
    """What keeps protocol version 1: a host that never claims the CPU balloon never
    receives a message it does not know."""
    host = rig.session()
    host.send(proto.Target(seq=3, balloon_pages=100))
    for _ in range(20):
        rig.step()
    messages = host.receive()
    assert messages and not reports(messages)
    assert not [e for e in errors(messages) if e.code.startswith("cpu-")]
    assert rig.sysfs.offline() == set()


def test_reserving_is_paced_reported_after_every_change_and_takes_the_highest(rig: Rig) -> None:
    rig = Rig(rig.root.parent / "eight", vcpus=8)
    host = rig.session()
    host.send(proto.CpuTarget(seq=3, reserved_vcpus=6))
    held_per_step = []
    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for _ in range(5):
        rig.step()
        held_per_step.append(len(rig.held()))
        seen += reports(host.receive())
    # The rate counts vCPUs: 1 to start, one more after every step that got all it
    # asked for.
    assert held_per_step == [1, 3, 6, 6, 6]
    assert seen == [
        ((0, 1, 2, 3, 4, 5, 6), (7,)),
        ((0, 1, 2, 3, 4), (5, 6, 7)),
        ((0, 1), (2, 3, 4, 5, 6, 7)),
    ]
    assert rig.sysfs.offline() == {2, 3, 4, 5, 6, 7}


def test_a_target_is_answered_by_a_report_even_when_nothing_moves(rig: Rig) -> None:
    host = rig.session()
    host.send(proto.CpuTarget(seq=3, reserved_vcpus=0))
    rig.step()
    assert reports(host.receive()) == [((0, 1, 2, 3), ())]
    for _ in range(8):  # nothing changes: nothing more to say
        rig.step()
    assert reports(host.receive()) == []


def test_deflating_brings_back_the_most_recently_reserved_first(rig: Rig) -> None:
    host = rig.session()
    host.send(proto.CpuTarget(seq=3, reserved_vcpus=3))
    rig.run_until(lambda: len(rig.held()) == 3)
    assert rig.held() == (3, 2, 1)
    host.send(proto.CpuTarget(seq=4, reserved_vcpus=1))
    rig.step()  # deflation is not paced by the rate: both at once
    assert rig.held() == (3,)
    assert rig.hotplug.writes[-2:] == [(1, True), (2, True)]
    assert reports(host.receive())[-1] == ((0, 1, 2), (3,))


@pytest.mark.parametrize("target", [4, 5, proto.MAX_VCPUS - 1])
def test_a_target_that_would_take_the_last_vcpu_is_refused_and_nothing_moves(
    rig: Rig, target: int
) -> None:
    host = rig.session()
    host.send(proto.CpuTarget(seq=3, reserved_vcpus=2))
    rig.run_until(lambda: len(rig.held()) == 2)
    host.receive()
    writes = len(rig.hotplug.writes)
    host.send(proto.CpuTarget(seq=4, reserved_vcpus=target))
    for _ in range(8):
        rig.step()
    messages = host.receive()
    (refusal,) = errors(messages)
    assert refusal.code == "cpu-refused"
    assert f"cpu_target {target} refused" in refusal.message
    assert "would leave none online" in refusal.message
    assert reports(messages) == [((0, 1), (2, 3))]  # where it stays
    assert len(rig.hotplug.writes) == writes and rig.held() == (3, 2)
    assert rig.agent.counters["cpu_refused"] == 1


def test_a_refused_target_in_the_middle_of_inflating_stops_where_it_is(rig: Rig) -> None:
    host = rig.session()
    host.send(proto.CpuTarget(seq=3, reserved_vcpus=3))
    rig.step()
    assert len(rig.held()) == 1
    host.send(proto.CpuTarget(seq=4, reserved_vcpus=4))
    for _ in range(5):
        rig.step()
    assert rig.held() == (3,)
    assert [e.code for e in errors(host.receive())] == ["cpu-refused"]


def test_a_host_repeating_a_refused_target_gets_one_error_per_interval(rig: Rig) -> None:
    host = rig.session()
    for seq in range(3, 23):
        host.send(proto.CpuTarget(seq=seq, reserved_vcpus=4))
        rig.step()
    assert [e.code for e in errors(host.receive())] == ["cpu-refused"]
    rig.clock.now_s += CONFIG.error_interval_s
    host.send(proto.CpuTarget(seq=30, reserved_vcpus=4))
    rig.step()
    assert [e.code for e in errors(host.receive())] == ["cpu-refused"]


def test_a_kernel_that_refuses_cuts_the_rate_and_the_agent_tries_again(rig: Rig) -> None:
    rig = Rig(rig.root.parent / "eight", vcpus=8)
    host = rig.session()
    host.send(proto.CpuTarget(seq=3, reserved_vcpus=6))
    held_per_step = []
    for refused in (set(), set(), {4}, set(), set()):
        rig.hotplug.refuse = refused  # EBUSY for these
        rig.step()
        held_per_step.append(len(rig.held()))
    # 1, then 2 more; the refused step gets none and halves the rate from 3 to 1; then
    # 1 and 2 again.
    assert held_per_step == [1, 3, 3, 4, 6]
    messages = host.receive()
    assert [e.code for e in errors(messages)] == ["cpu-failed"]
    assert "busy" in errors(messages)[0].message
    assert reports(messages)[-1] == ((0, 1), (2, 3, 4, 5, 6, 7))
    assert rig.agent.counters["cpu_failures"] == 1


def test_a_vcpu_someone_else_brings_back_is_forgotten_and_the_target_kept(rig: Rig) -> None:
    host = rig.session()
    host.send(proto.CpuTarget(seq=3, reserved_vcpus=2))
    rig.run_until(lambda: len(rig.held()) == 2)
    host.receive()
    rig.sysfs.switch(3, True)  # an administrator onlines it behind the balloon's back
    rig.sysfs.switch(1, False)  # and takes another down, which is not the balloon's
    rig.run_until(lambda: rig.agent.counters["cpus_taken_back"] == 1)
    # The target still says 2: the balloon keeps to it, with the highest online vCPU.
    assert rig.held() == (2, 3) and rig.hotplug.writes[-1] == (3, False)
    assert reports(host.receive()) == [((0,), (2, 3))]


def test_shutdown_brings_every_reserved_vcpu_back_and_says_so(rig: Rig) -> None:
    host = rig.session()
    host.send(proto.CpuTarget(seq=3, reserved_vcpus=3))
    rig.run_until(lambda: len(rig.held()) == 3)
    host.receive()
    rig.agent.close()
    assert rig.sysfs.offline() == set() and rig.held() == ()
    assert reports(host.receive()) == [((0, 1, 2, 3), ())]


def test_shutdown_gives_back_more_than_one_steps_worth(rig: Rig) -> None:
    rig = Rig(rig.root.parent / "many", vcpus=2 * CPU_MAX_PER_STEP + 3)
    host = rig.session()
    host.send(proto.CpuTarget(seq=3, reserved_vcpus=rig.vcpus - 1))
    rig.run_until(lambda: len(rig.held()) == rig.vcpus - 1)
    rig.agent.close()
    assert rig.sysfs.offline() == set()


def test_a_reset_gives_the_vcpus_back_unless_the_new_session_claims_them(rig: Rig) -> None:
    host = rig.session()
    host.send(proto.CpuTarget(seq=3, reserved_vcpus=2))
    rig.run_until(lambda: len(rig.held()) == 2)
    # The daemon reconnects and sets the CPU target again with its welcome: no churn.
    writes = len(rig.hotplug.writes)
    host.send(proto.Reset(seq=10))
    rig.step()
    host.send(proto.Welcome(seq=11, version=proto.VERSION))
    host.send(proto.CpuTarget(seq=12, reserved_vcpus=2))
    for _ in range(int(2 * CONFIG.cpu_unclaimed_s / CONFIG.step_s)):
        rig.step()
    assert rig.held() == (3, 2) and len(rig.hotplug.writes) == writes
    # A daemon that knows nothing of them (no CPU target): back online, unreported.
    host.receive()
    host.send(proto.Reset(seq=20))
    rig.step()
    host.send(proto.Welcome(seq=21, version=proto.VERSION))
    reset_at_s = rig.clock.now_s
    rig.run_until(lambda: rig.held() == ())
    assert rig.clock.now_s - reset_at_s >= CONFIG.cpu_unclaimed_s - CONFIG.step_s
    assert rig.sysfs.offline() == set()
    assert reports(host.receive()) == []


def test_a_lost_host_leaves_the_vcpus_for_a_while_then_gives_them_back(rig: Rig) -> None:
    host = rig.session()
    host.send(proto.CpuTarget(seq=3, reserved_vcpus=1))
    rig.run_until(lambda: len(rig.held()) == 1)
    host.close()
    rig.step()
    assert rig.link() is Link.DOWN
    lost_at_s = rig.clock.now_s
    while rig.clock.now_s - lost_at_s < CONFIG.cpu_unclaimed_s - CONFIG.step_s:
        rig.step()
        assert rig.held() == (3,)  # a daemon restart should not churn the guest
    rig.run_until(lambda: rig.held() == ())
    assert rig.sysfs.offline() == set()


def test_an_agent_without_a_cpu_balloon_refuses_every_target(tmp_path: Path) -> None:
    host = FakeHost([])
    ports = Ports()
    ports.queue.append(host)
    clock = FakeClock()
    agent = Agent(ports, FakeKernel([]), FakePressure(), clock, TOKEN, CONFIG)
    agent.run_once()
    host.send(proto.Welcome(seq=1, version=1), proto.Welcome(seq=2, version=1))
    host.send(proto.CpuTarget(seq=3, reserved_vcpus=1))
    clock.now_s += CONFIG.step_s
    agent.run_once()
    (refusal,) = errors(host.receive())
    assert refusal.code == "cpu-refused" and "no CPU balloon" in refusal.message


def test_vcpus_adopted_from_an_earlier_agent_come_back_unless_a_host_claims_them(
    tmp_path: Path,
) -> None:
    for claimed in (True, False):
        tree = FakeSysfs(tmp_path / f"cpu-{claimed}", 4)
        state = tmp_path / f"state-{claimed}"
        CpuBalloon(CpuHotplug(tree.root), state).reserve(2)  # the agent that died
        balloon = CpuBalloon(FlakyHotplug(tree.root), state)
        assert balloon.adopt() == [3, 2]
        host = FakeHost([])
        ports = Ports()
        ports.queue.append(host)
        clock = FakeClock()
        agent = Agent(ports, FakeKernel([]), FakePressure(), clock, TOKEN, CONFIG, cpus=balloon)
        agent.run_once()
        host.send(proto.Welcome(seq=1, version=1), proto.Welcome(seq=2, version=1))
        if claimed:  # the daemon sets its CPU target again with the new agent's welcome
            host.send(proto.CpuTarget(seq=3, reserved_vcpus=2))
        for _ in range(int(2 * CONFIG.cpu_unclaimed_s / CONFIG.step_s)):
            clock.now_s += CONFIG.step_s
            agent.run_once()
        assert tree.offline() == ({2, 3} if claimed else set())
        assert reports(host.receive()) == ([((0, 1), (2, 3))] if claimed else [])
