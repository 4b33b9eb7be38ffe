"""The agent loop with the real LinuxKernel on this host (root): what the fake host is
told is exactly what the process has pinned, every page filled with its mark."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from balloonist.agent import protocol as proto
from balloonist.agent.hostlink import Link
from balloonist.agent.linux import PAGE_SIZE_BYTES, LinuxKernel, page_mark
from balloonist.agent.main import Agent, AgentConfig

from .fakes import FakeClock, FakeHost, FakePressure, Ports, pages_of

pytestmark = pytest.mark.root(reason="needs Linux and root (pagemap PFNs)")

TARGET_PAGES = (6 << 20) // PAGE_SIZE_BYTES


def locked_bytes() -> int:
    match = re.search(r"^VmLck:\s+(\d+) kB$", Path("/proc/self/status").read_text(), re.M)
    assert match is not None
    return int(match.group(1)) * 1024


def test_agent_with_the_real_kernel_reports_what_it_pins() -> None:
    before = locked_bytes()
    clock, ports, events = FakeClock(), Ports(), list[str]()
    host = FakeHost(events, reset=False)
    ports.queue.append(host)
    token = "5a5a5a5a00ff00ff"
    kernel = LinuxKernel(token)
    config = AgentConfig(step_s=0.25, page_size_bytes=PAGE_SIZE_BYTES)
    agent = Agent(ports, kernel, FakePressure(), clock, token, config)
    try:
        agent.run_once()
        (hello,) = host.receive()
        assert isinstance(hello, proto.Hello) and hello.token == token
        host.send(proto.Welcome(seq=0, version=proto.VERSION))
        host.send(proto.Target(seq=1, balloon_pages=TARGET_PAGES))
        for _ in range(100):
            clock.now_s += config.step_s
            agent.run_once()
            if agent.driver.size_units == TARGET_PAGES:
                break
        assert agent.link is Link.UP and agent.driver.size_units == TARGET_PAGES
        locked = pages_of(host.receive(), proto.Locked)
        assert len(locked) == TARGET_PAGES
        assert locked_bytes() - before == TARGET_PAGES * PAGE_SIZE_BYTES
        marks = bytes.fromhex(hello.token)
        assert all(kernel.read_page(pfn) == page_mark(marks, pfn) for pfn in locked)

        host.send(proto.Target(seq=2, balloon_pages=TARGET_PAGES // 3))
        clock.now_s += config.step_s
        agent.run_once()
        unlocked = pages_of(host.receive(), proto.Unlocked)
        assert len(unlocked) == TARGET_PAGES - TARGET_PAGES // 3
        assert locked_bytes() - before == (TARGET_PAGES // 3) * PAGE_SIZE_BYTES

        agent.close()
        assert pages_of(host.receive(), proto.Unlocked) == locked - unlocked
        assert locked_bytes() == before
    finally:
        kernel.close()
