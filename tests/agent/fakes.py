"""Fakes for the agent's ports: a host at the other end of a socketpair, a guest kernel
that hands out frames from a pool, a pressure reading, a clock the test moves, and a
sysfs CPU tree."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from balloonist.agent import protocol as proto
from balloonist.agent.cpus import CpuHotplug
from balloonist.agent.hostlink import Link
from balloonist.agent.main import Agent
from balloonist.agent.pressure import PressureSample
from balloonist.errors import TransientBackendError
from balloonist.units import GIB
from tests.fakes import FakeKernel as SharedFakeKernel

PAGE = 4096


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


class Stepping:
    """What a test rig around an :class:`Agent` does with time: one step of the agent's
    loop, then the fake clock moves on by the agent's step."""

    agent: Agent
    clock: FakeClock
    #: Enough steps for any change a rig's tests make; a loop that needs more fails.
    max_steps: ClassVar[int] = 100

    def link(self) -> Link:  # a call, so mypy does not narrow it across steps
        return self.agent.link

    def step(self) -> None:
        self.agent.run_once()
        self.clock.now_s += self.agent.config.step_s

    def run_until(self, condition: Callable[[], bool]) -> None:
        for _ in range(self.max_steps):
            if condition():
                return
            self.step()
        raise AssertionError(f"not reached in {self.max_steps} steps")


class FakeKernel(SharedFakeKernel):
    """The agent tests' kernel: frame 0 is never handed out, as in a real guest."""

    def __init__(self, events: list[str], frames: int = 1 << 20) -> None:
        super().__init__(frames, first_frame=1, events=events)


class FakePressure:
    """A guest of 4 GiB with plenty available and no PSI stall, unless a test says otherwise."""

    def __init__(self) -> None:
        self.sample = PressureSample(
            mem_total_bytes=4 * GIB,
            mem_available_bytes=3 * GIB,
            psi_some_avg10=0.0,
            psi_full_avg10=0.0,
            refaults=7,
            swap_in_pages=1,
            swap_out_pages=2,
        )
        self.fail = False
        #: If set, MemAvailable comes from it (e.g. to shrink as the balloon grows).
        self.available: Callable[[], int] | None = None

    def set(self, **changes: Any) -> None:
        self.sample = replace(self.sample, **changes)

    def read(self) -> PressureSample:
        if self.fail:
            raise TransientBackendError("fake: /proc unreadable")
        if self.available is not None:
            return replace(self.sample, mem_available_bytes=self.available())
        return self.sample


class FakeHost:
    """The host end of one connection. It decodes what the agent sends with the host's
    own strict decoder, so every agent message in a test is also checked against the
    protocol."""

    def __init__(self, events: list[str], *, reset: bool = True) -> None:
        self.sock, agent_end = socket.socketpair()
        self.sock.setblocking(False)
        self.agent_fd: int | None = agent_end.detach()
        self.events = events
        self.received: list[proto.GuestMessage] = []
        self._buffer = b""
        self.version = proto.VERSION  # the last welcome's: how the agent's lines are read
        self.eof = False
        if reset:  # what the real host sends first on every connection
            self.send(proto.Reset(seq=0))

    def send(self, *messages: proto.HostMessage) -> None:
        for message in messages:
            if isinstance(message, proto.Welcome):  # the session's version, as a host's
                self.version = message.version
            self.sock.sendall(proto.encode(message))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive_lines(self) -> list[bytes]:
        """Every line the agent has written so far (its writes finish inside run_once)."""
        if self.sock.fileno() < 0:  # closed by the test: the host is gone
            return []
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            except ConnectionResetError:  # the agent closed with our replies unread
                data = b""
            if not data:
                self.eof = True
                break
            self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        return [line + b"\n" for line in lines]

    def receive(self) -> list[proto.GuestMessage]:
        """Every message the agent has written so far, decoded as the host would."""
        new: list[proto.GuestMessage] = []
        for line in self.receive_lines():
            message = proto.decode_guest_message(line, self.version)
            new.append(message)
            if isinstance(message, (proto.Locked, proto.Unlocked)):
                kind = type(message).__name__.lower()
                self.events.extend(f"{kind} {r.start}+{r.count}" for r in message.ranges)
        self.received.extend(new)
        return new

    def close(self) -> None:
        self.sock.close()


class Ports:
    """The agent's ``open_port``: hands out queued hosts' ends, else 'no such device'."""

    def __init__(self) -> None:
        self.queue: list[FakeHost] = []
        self.opens = 0

    def __call__(self) -> int:
        self.opens += 1
        if not self.queue:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        host = self.queue.pop(0)
        assert host.agent_fd is not None
        fd, host.agent_fd = host.agent_fd, None
        return fd


def pages_of(messages: Sequence[proto.GuestMessage], kind: type) -> set[int]:
    """Every page in the ``kind`` (Locked or Unlocked) messages."""
    pages: set[int] = set()
    for m in messages:
        if isinstance(m, (proto.Locked, proto.Unlocked)) and isinstance(m, kind):
            pages.update(p for r in m.ranges for p in range(r.start, r.end))
    return pages


class FakeSysfs:
    """A fake ``/sys/devices/system/cpu``: the ``possible``/``present``/``online`` lists
    and one ``cpuN/online`` file per hotpluggable vCPU, as Linux lays them out (cpu0 of
    an x86 guest has none). Writing a vCPU's file is what the kernel would act on; the
    ``online`` list is kept for the others, as reading code must not rely on it for
    hotpluggable vCPUs (the fake does not rewrite it, the real kernel would)."""

    def __init__(self, root: Path, cpus: int, *, cpu0_hotpluggable: bool = False) -> None:
        self.root = root
        every = f"0-{cpus - 1}" if cpus > 1 else "0"
        root.mkdir(parents=True, exist_ok=True)
        for name in ("possible", "present", "online"):
            (root / name).write_text(every + "\n")
        (root / "kernel_max").write_text("8191\n")
        for cpu in range(cpus):
            (root / f"cpu{cpu}").mkdir()
            if cpu > 0 or cpu0_hotpluggable:
                (root / f"cpu{cpu}" / "online").write_text("1\n")

    def online_file(self, cpu: int) -> Path:
        return self.root / f"cpu{cpu}" / "online"

    def switch(self, cpu: int, online: bool) -> None:
        """Someone else (an administrator) brings a vCPU up or down."""
        self.online_file(cpu).write_text("1\n" if online else "0\n")

    def offline(self) -> set[int]:
        return {
            int(path.parent.name[3:])
            for path in self.root.glob("cpu*/online")
            if path.read_text().strip() == "0"
        }


class FlakyHotplug(CpuHotplug):
    """The real sysfs adapter whose writes the test can make the kernel refuse."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.refuse: set[int] = set()  # writes to these fail with EBUSY
        self.ignore: set[int] = set()  # writes to these "succeed" and change nothing
        self.writes: list[tuple[int, bool]] = []

    def set_online(self, cpu: int, online: bool) -> None:
        self.writes.append((cpu, online))
        if cpu in self.refuse:
            raise TransientBackendError(f"cannot take cpu{cpu} offline: Device or resource busy")
        if cpu not in self.ignore:
            super().set_online(cpu, online)
