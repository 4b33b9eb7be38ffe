"""The agent loop against a fake host over a socketpair, a fake kernel and a fake clock:
the handshake, inflation and deflation with their reports, the pressure guard, bad host
input, stats, the message budget, losing the host and adopting the balloon into a new
session, shutdown."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from balloonist.agent import protocol as proto
from balloonist.agent.hostlink import MESSAGE_BURST, Link
from balloonist.agent.main import MIB, Agent, AgentConfig
from balloonist.driver import UnitRange
from balloonist.rate import AdaptiveRate, RateLimits

from .fakes import (
    PAGE,
    FakeClock,
    FakeHost,
    FakeKernel,
    FakePressure,
    Ports,
    Stepping,
    pages_of,
)

TOKEN = "00112233aabbccdd"
LIMITS = RateLimits(min_units=64, max_units=1024, increase_units=128, divisor=2.0)
#: Steps of 0.25 s add up exactly in binary floating point, so "every 1 s" is exact.
CONFIG = AgentConfig(step_s=0.25, stats_s=1.0, floor_bytes=256 * MIB, page_size_bytes=PAGE)
#: Enough steps for any inflation in these tests to finish; a loop that needs more fails.
MAX_STEPS = 200


@dataclass
class Rig(Stepping):
    max_steps: ClassVar[int] = MAX_STEPS

    events: list[str] = field(default_factory=list)
    clock: FakeClock = field(default_factory=FakeClock)
    ports: Ports = field(default_factory=Ports)
    pressure: FakePressure = field(default_factory=FakePressure)

    def __post_init__(self) -> None:
        self.kernel = FakeKernel(self.events)
        self.agent = Agent(
            self.ports,
            self.kernel,
            self.pressure,
            self.clock,
            TOKEN,
            CONFIG,
            rate=AdaptiveRate(LIMITS),
        )

    def host(self, *, reset: bool = True) -> FakeHost:
        host = FakeHost(self.events, reset=reset)
        self.ports.queue.append(host)
        return host

    def session(self, target_pages: int = 0) -> FakeHost:
        """Connect a new host, welcome both hellos, set a target, run until it is reached."""
        host = self.host()
        self.step()
        hellos = host.receive()
        # one hello on opening the port, one answering the host's reset
        assert [type(m) for m in hellos] == [proto.Hello, proto.Hello]
        host.send(proto.Welcome(seq=1, version=proto.VERSION))
        host.send(proto.Welcome(seq=2, version=proto.VERSION))
        if target_pages:
            host.send(proto.Target(seq=3, balloon_pages=target_pages))
        self.step()
        assert self.link() is Link.UP
        self.run_until(lambda: self.agent.driver.size_units == target_pages)
        return host


@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_hello_carries_the_token_and_nothing_inflates_before_welcome(rig: Rig) -> None:
    host = rig.host(reset=False)
    rig.step()
    (hello,) = host.receive()
    assert isinstance(hello, proto.Hello)
    assert (hello.seq, hello.version, hello.page_size, hello.token) == (
        0,
        proto.VERSION,
        PAGE,
        TOKEN,
    )
    assert rig.link() is Link.HELLO_SENT
    host.send(proto.Target(seq=0, balloon_pages=500))  # before welcome: not a session yet
    for _ in range(5):
        rig.step()
    assert rig.agent.driver.size_units == 0
    assert host.receive() == []
    assert rig.agent.counters["unexpected"] == 1


def test_the_session_starts_when_the_last_hello_is_answered(rig: Rig) -> None:
    host = rig.host()
    rig.step()
    assert len(host.receive()) == 2
    host.send(proto.Welcome(seq=1, version=proto.VERSION))
    rig.step()
    assert rig.link() is Link.HELLO_SENT  # the host has forgotten the first hello
    host.send(proto.Welcome(seq=2, version=proto.VERSION))
    rig.step()
    assert rig.link() is Link.UP


def test_inflation_reports_exactly_the_pinned_pages_with_increasing_seq(rig: Rig) -> None:
    host = rig.session(target_pages=1000)
    messages = host.receive()
    locked = [m for m in messages if isinstance(m, proto.Locked)]
    # The rate paces it: 64, then +128 per full step.
    assert [sum(r.count for r in m.ranges) for m in locked] == [64, 192, 320, 424]
    assert pages_of(messages, proto.Locked) == rig.kernel.held
    seqs = [m.seq for m in host.received]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_deflation_reports_unlocked_before_the_kernel_frees(rig: Rig) -> None:
    host = rig.session(target_pages=600)
    host.receive()
    reported_when_freed: list[set[int]] = []
    original = rig.kernel.free_units

    def free_and_look(ranges: Sequence[UnitRange]) -> None:
        # what the host has been sent at the moment the kernel frees
        host.receive()
        reported_when_freed.append(pages_of(host.received, proto.Unlocked))
        original(ranges)

    rig.kernel.free_units = free_and_look  # type: ignore[method-assign]
    before = set(rig.kernel.held)
    host.send(proto.Target(seq=4, balloon_pages=100))
    rig.step()
    assert rig.agent.driver.size_units == 100
    freed = before - rig.kernel.held
    assert len(freed) == 500
    assert reported_when_freed == [freed]


def test_floor_guard_gives_back_the_shortfall_and_cuts_the_rate(rig: Rig) -> None:
    host = rig.session(target_pages=1000)
    host.receive()
    rate_before = rig.agent.driver.rate.step_units
    assert rate_before > LIMITS.min_units
    short_bytes = 100 * PAGE + 1  # rounds up to 101 pages
    rig.pressure.set(mem_available_bytes=256 * MIB - short_bytes)
    rig.step()
    assert rig.agent.driver.size_units == 1000 - 101
    assert rig.agent.guarded
    assert rig.agent.driver.rate.step_units == rate_before // 2
    messages = host.receive()
    assert [m.code for m in messages if isinstance(m, proto.Error)] == ["pressure"]
    assert len(pages_of(messages, proto.Unlocked)) == 101
    # The guest has what it lacked: no further deflation, and no regrowth either.
    rig.pressure.set(mem_available_bytes=256 * MIB)
    for _ in range(5):
        rig.step()
    assert rig.agent.driver.size_units == 1000 - 101
    assert not rig.agent.guarded


def test_inflation_stops_at_the_floor(rig: Rig) -> None:
    # MemAvailable shrinks as the balloon grows, from 70 pages above the floor
    rig.pressure.available = lambda: 256 * MIB + (70 - len(rig.kernel.held)) * PAGE
    host = rig.session(target_pages=0)
    host.send(proto.Target(seq=4, balloon_pages=1000))
    for _ in range(10):
        rig.step()
    assert rig.agent.driver.size_units == 70
    assert not rig.agent.guarded  # at the floor, not below it


def test_psi_above_the_limit_holds_the_balloon(rig: Rig) -> None:
    host = rig.session(target_pages=200)
    host.send(proto.Target(seq=4, balloon_pages=1000))
    rig.pressure.set(psi_some_avg10=25.0)
    for _ in range(10):
        rig.step()
    assert rig.agent.driver.size_units == 200
    assert rig.agent.driver.rate.step_units == LIMITS.min_units
    rig.pressure.set(psi_some_avg10=3.0)
    rig.run_until(lambda: rig.agent.driver.size_units == 1000)


def test_unreadable_pressure_never_grows_the_balloon(rig: Rig) -> None:
    host = rig.session(target_pages=100)
    host.send(proto.Target(seq=4, balloon_pages=500))
    rig.pressure.fail = True
    for _ in range(5):
        rig.step()
    assert rig.agent.driver.size_units == 100


def test_bad_and_overlong_host_lines_are_dropped_and_the_loop_goes_on(rig: Rig) -> None:
    host = rig.session()
    host.send_raw(b"this is not json\n")
    host.send_raw(b'{"type":"target","seq":1,"balloon_pages":-5}\n')
    # an overlong line in two pieces, so the splitter meets it across reads
    host.send_raw(b"x" * (proto.MAX_LINE_BYTES - 10))
    rig.step()
    host.send_raw(b"y" * 100 + b"\n")
    host.send(proto.Target(seq=4, balloon_pages=64))
    rig.step()
    assert rig.agent.driver.size_units == 64
    assert rig.agent.counters["bad_lines"] == 3
    assert rig.link() is Link.UP


def test_stats_go_out_every_stats_s(rig: Rig) -> None:
    host = rig.session(target_pages=64)
    host.receive()
    sent_at_s: list[float] = []
    stats: list[proto.Stats] = []
    for _ in range(12):  # 3 s of steps
        now_s = rig.clock.now_s
        rig.step()
        new = [m for m in host.receive() if isinstance(m, proto.Stats)]
        sent_at_s += [now_s] * len(new)
        stats += new
    assert [b - a for a, b in itertools.pairwise(sent_at_s)] == [1.0, 1.0]
    assert stats[-1].balloon_pages == 64
    assert (stats[-1].refaults, stats[-1].swap_in_pages, stats[-1].swap_out_pages) == (7, 1, 2)
    assert stats[-1].mem_available_bytes == rig.pressure.sample.mem_available_bytes


def test_allocation_failures_send_rate_limited_errors(rig: Rig) -> None:
    host = rig.session()
    rig.kernel.limit = 10
    host.send(proto.Target(seq=4, balloon_pages=10_000))
    for _ in range(16):  # 4 s: less than error_interval_s
        rig.step()
    errors = [m for m in host.receive() if isinstance(m, proto.Error)]
    assert [e.code for e in errors] == ["alloc-failed"]
    rig.clock.now_s += CONFIG.error_interval_s
    rig.step()
    assert [m.code for m in host.receive() if isinstance(m, proto.Error)] == ["alloc-failed"]


def test_no_welcome_closes_the_port_and_retries(rig: Rig) -> None:
    first = rig.host()
    rig.step()
    rig.clock.now_s += CONFIG.welcome_timeout_s
    rig.step()
    assert rig.link() is Link.DOWN
    first.receive()
    assert first.eof
    second = rig.host()
    rig.clock.now_s += CONFIG.retry_s
    rig.step()
    assert [type(m) for m in second.receive()] == [proto.Hello, proto.Hello]


def test_a_missing_port_is_retried_every_retry_s(rig: Rig) -> None:
    rig.step()
    rig.step()
    assert rig.ports.opens == 1
    rig.clock.now_s += CONFIG.retry_s
    rig.step()
    assert rig.ports.opens == 2


def test_a_lost_host_leaves_the_balloon_and_a_new_session_adopts_it(rig: Rig) -> None:
    old_host = rig.session(target_pages=500)
    old_pages = set(rig.kernel.held)
    old_host.close()
    rig.step()
    assert rig.link() is Link.DOWN
    for _ in range(5):  # no host: the balloon is held, not given back
        rig.step()
    assert rig.kernel.held == old_pages

    new_host = rig.host()
    rig.clock.now_s += CONFIG.retry_s
    rig.step()
    assert [type(m) for m in new_host.receive()] == [proto.Hello, proto.Hello]
    new_host.send(proto.Welcome(seq=1, version=proto.VERSION))
    new_host.send(proto.Welcome(seq=2, version=proto.VERSION))
    rig.step()
    # The new host hears of every page the balloon still holds, and nothing moves.
    assert pages_of(new_host.receive(), proto.Locked) == old_pages
    assert rig.kernel.held == old_pages
    new_host.send(proto.Target(seq=3, balloon_pages=200))
    rig.step()
    assert len(pages_of(new_host.receive(), proto.Unlocked)) == 300
    assert rig.kernel.held <= old_pages and len(rig.kernel.held) == 200


def test_a_reset_mid_session_re_reports_the_balloon(rig: Rig) -> None:
    host = rig.session(target_pages=300)
    held = set(rig.kernel.held)
    host.receive()
    host.send(proto.Reset(seq=10))
    rig.step()
    (hello,) = host.receive()
    assert isinstance(hello, proto.Hello) and rig.link() is Link.HELLO_SENT
    host.send(proto.Welcome(seq=11, version=proto.VERSION))
    rig.step()
    assert pages_of(host.receive(), proto.Locked) == held


def test_a_welcome_of_another_version_ends_the_attempt(rig: Rig) -> None:
    host = rig.host(reset=False)
    rig.step()
    host.send(proto.Welcome(seq=0, version=proto.VERSION + 1))
    rig.step()
    assert rig.link() is Link.DOWN


def test_reports_stay_within_the_message_budget(rig: Rig) -> None:
    """Every page its own range (a fragmented guest): the agent paces itself so the host's
    limit (100 messages/s, bursts of 500) is never reached; here it keeps to its own."""
    rig.kernel.free = list(range(2_000_000, 0, -2))  # no two frames touch
    rig.agent.driver.rate = AdaptiveRate(RateLimits(min_units=100_000, max_units=100_000))
    host = rig.session()
    host.receive()
    host.send(proto.Target(seq=4, balloon_pages=200_000))
    sent: list[int] = []
    for _ in range(40):  # 10 s
        rig.step()
        sent.append(len(host.receive()))
    assert max(sent) <= MESSAGE_BURST
    assert sum(sent) <= MESSAGE_BURST + 50 * 10
    assert rig.agent.driver.size_units > 100_000  # and it still got somewhere


def test_close_releases_everything_and_reports_it(rig: Rig) -> None:
    host = rig.session(target_pages=700)
    locked = pages_of(host.receive(), proto.Locked)
    rig.agent.close()
    messages = host.receive()
    assert pages_of(messages, proto.Unlocked) == locked
    assert rig.kernel.held == set()
    assert host.eof


def test_closing_a_fragmented_balloon_stays_within_the_burst(rig: Rig) -> None:
    """A shutdown must not flood the host (it would cut the guest off): what does not fit
    the budget goes back to the guest unreported."""
    rig.kernel.free = list(range(2_000_000, 0, -2))  # no two frames touch
    rig.agent.driver.rate = AdaptiveRate(RateLimits(min_units=100_000, max_units=100_000))
    host = rig.session()
    host.send(proto.Target(seq=4, balloon_pages=200_000))
    rig.run_until(lambda: rig.agent.driver.size_units > 150_000)
    held = rig.agent.driver.size_units
    rig.clock.now_s += 60  # the budget is full again
    sent_before = rig.agent.counters["sent"]
    rig.agent.close()
    sent_at_close = rig.agent.counters["sent"] - sent_before
    assert 0 < sent_at_close <= MESSAGE_BURST
    assert rig.kernel.held == set()  # all of it went back to the guest
    # a full budget's worth of ranges (one page each here) was reported, the rest not
    assert 0 < rig.agent.counters["unreported_pages"] < held
