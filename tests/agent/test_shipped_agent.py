"""The shipped .pyz end to end, as a guest would run it: a separate process (on Python
3.9 when there is one, else this Python without site-packages) as root, its port a
raw pty standing in for the virtio-serial port, this test playing the host. It pins
what the host asks for, really (VmLck), and on SIGTERM gives everything back, says so,
and exits 0."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from balloonist.agent import protocol as proto
from balloonist.agent.pyz import build_pyz

from .fakes import pages_of
from .interpreters import python_3_9

pytestmark = pytest.mark.root(reason="needs Linux and root (pagemap PFNs)")

TARGET_PAGES = 1024  # 4 MiB
#: Generous: the agent steps every 50 ms here, and starting Python takes well under 1 s.
DEADLINE_S = 30.0


class PtyHost:
    """The host end of a raw pty: whole lines in and out, waits with a deadline."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no echo, no line editing, no CR/LF translation
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self.received: list[proto.GuestMessage] = []
        self._buffer = b""
        self.version = proto.VERSION  # the last welcome's: how the agent's lines are read

    def send(self, *messages: proto.HostMessage) -> None:
        for message in messages:
            if isinstance(message, proto.Welcome):  # the session's version, as a host's
                self.version = message.version
        os.write(self.master, b"".join(proto.encode(m) for m in messages))

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not condition():
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise AssertionError(f"no {what} within {DEADLINE_S} s: {self.received[-5:]}")
            ready, _, _ = select.select([self.master], [], [], remaining_s)
            if ready:
                self._read()

    def _read(self) -> None:
        try:
            self._buffer += os.read(self.master, 1 << 16)
        except BlockingIOError:
            return
        except OSError:  # EIO: the agent closed the port
            return
        *lines, self._buffer = self._buffer.split(b"\n")
        self.received += [proto.decode_guest_message(line + b"\n", self.version) for line in lines]

    def count(self, kind: type) -> int:
        return sum(isinstance(m, kind) for m in self.received)

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def host() -> Iterator[PtyHost]:
    h = PtyHost()
    yield h
    h.close()


def locked_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmLck:\s+(\d+) kB$", status, re.MULTILINE)
    assert match is not None
    return int(match.group(1)) * 1024


def test_the_shipped_agent_pins_on_request_and_releases_on_sigterm(
    host: PtyHost, tmp_path: Path
) -> None:
    pyz = build_pyz(tmp_path / "balloonist-agent.pyz")
    python = python_3_9() or sys.executable
    agent = subprocess.Popen(
        [python, "-I", "-S", str(pyz), "--port", host.path, "--no-tune", "--step-s", "0.05"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        host.send(proto.Reset(seq=0))  # waits in the pty until the agent reads it
        host.wait_for(lambda: host.count(proto.Hello) == 2, "two hellos (open, reset)")
        host.send(proto.Welcome(seq=1, version=1), proto.Welcome(seq=2, version=1))
        host.send(proto.Target(seq=3, balloon_pages=TARGET_PAGES))
        host.wait_for(
            lambda: len(pages_of(host.received, proto.Locked)) == TARGET_PAGES, "locked pages"
        )
        assert locked_bytes(agent.pid) == TARGET_PAGES * 4096
        host.wait_for(lambda: host.count(proto.Stats) >= 1, "stats")

        agent.send_signal(signal.SIGTERM)
        host.wait_for(
            lambda: (
                pages_of(host.received, proto.Unlocked) == pages_of(host.received, proto.Locked)
            ),
            "every page unlocked",
        )
        _, err = agent.communicate(timeout=DEADLINE_S)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == 0, err
    assert "stopped; balloon released" in err
