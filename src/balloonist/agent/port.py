"""The agent's end of the virtio-serial port: finding it, and a non-blocking line stream.

In a guest with udev the port is ``/dev/virtio-ports/org.balloonist.agent.0``; without
udev it is the ``/dev/vportNpM`` whose ``/sys/class/virtio-ports/vportNpM/name`` is
that name. :class:`LineStream` works on any file descriptor (a port, a pty, one end of
a socketpair in tests): it never blocks, frames input into lines of at most
``MAX_LINE_BYTES`` (a longer line is dropped whole and counted), and queues output
that the port cannot take yet.

A virtio-serial port reads as end-of-file while no host is connected and refuses
writes (EAGAIN) until one is; a host that closes its end gives EOF, a pty EIO. All of
these surface as :class:`PortClosedError`, and the agent reopens the port later.

Stdlib only, Python 3.9.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from pathlib import Path

from balloonist.agent.protocol import MAX_LINE_BYTES, PORT_NAME
from balloonist.errors import TransientBackendError

DEV_PATH = Path("/dev")
SYS_PORTS_PATH = Path("/sys/class/virtio-ports")
#: Read at most this much per ``read_lines``, so a flooding host cannot starve the loop.
MAX_READ_BYTES_PER_CALL = 1 << 20
#: Unsent output beyond this means the host stopped reading: treat it as gone.
MAX_OUTBOX_BYTES = 64 << 20
_CHUNK_BYTES = 1 << 16


class PortClosedError(TransientBackendError):
    """The host end went away (EOF, EIO, EPIPE), or stopped reading."""


def find_port(dev_path: Path = DEV_PATH, sys_path: Path = SYS_PORTS_PATH) -> Path:
    """The agent's port: the udev symlink, else the ``vportNpM`` whose name matches."""
    link = dev_path / "virtio-ports" / PORT_NAME
    if link.exists():
        return link
    try:
        entries = sorted(sys_path.iterdir())
    except OSError:
        entries = []
    for entry in entries:
        try:
            name = (entry / "name").read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            continue
        if name == PORT_NAME:
            return dev_path / entry.name
    raise TransientBackendError(
        f"no virtio-serial port named {PORT_NAME} (is the agent channel in the VM?)"
    )


def open_port(path: Path | None = None) -> int:
    """Open the port (found with :func:`find_port` unless ``path`` is given), non-blocking."""
    target = path if path is not None else find_port()
    return os.open(target, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)


class LineStream:
    """A non-blocking, line-framed byte stream over one file descriptor it owns."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self._inbox = bytearray()
        self._skipping = False  # inside an overlong line: drop bytes up to its newline
        self._outbox = bytearray()
        self.overlong_lines = 0

    def read_lines(self) -> list[bytes]:
        """Complete lines available now, newline included. Raises PortClosedError."""
        lines: list[bytes] = []
        budget = MAX_READ_BYTES_PER_CALL
        while budget > 0:
            try:
                data = os.read(self.fd, min(_CHUNK_BYTES, budget))
            except BlockingIOError:
                break
            except OSError as exc:  # EIO: the other end of a pty hung up
                raise PortClosedError(f"read: {exc.strerror}") from exc
            if not data:
                raise PortClosedError("end of file (no host connected)")
            budget -= len(data)
            self._inbox += data
            lines.extend(self._split())
        return lines

    def _split(self) -> list[bytes]:
        lines: list[bytes] = []
        while True:
            newline = self._inbox.find(b"\n")
            if newline < 0:
                if len(self._inbox) >= MAX_LINE_BYTES:  # can only become overlong
                    self._inbox.clear()
                    if not self._skipping:
                        self.overlong_lines += 1
                        self._skipping = True
                return lines
            line = bytes(self._inbox[: newline + 1])
            del self._inbox[: newline + 1]
            if self._skipping:
                self._skipping = False
            elif len(line) > MAX_LINE_BYTES:
                self.overlong_lines += 1
            else:
                lines.append(line)

    def take_overlong_lines(self) -> int:
        count, self.overlong_lines = self.overlong_lines, 0
        return count

    def send(self, line: bytes) -> None:
        """Queue; ``flush`` writes."""
        self._outbox += line

    def flush(self) -> None:
        """Write what the port takes now. Raises PortClosedError."""
        while self._outbox:
            try:
                written = os.write(self.fd, bytes(self._outbox[:_CHUNK_BYTES]))
            except BlockingIOError:
                break
            except OSError as exc:
                raise PortClosedError(f"write: {exc.strerror}") from exc
            del self._outbox[:written]
        if len(self._outbox) > MAX_OUTBOX_BYTES:
            raise PortClosedError(f"the host has not read {len(self._outbox)} bytes")

    def drain(self, timeout_s: float) -> None:
        """Flush, waiting up to ``timeout_s`` for the port to take everything."""
        deadline = time.monotonic() + timeout_s
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        self.flush()
        while self._outbox:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise PortClosedError(f"{len(self._outbox)} bytes still unsent")
            poller.poll(remaining_s * 1000)
            self.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):  # closing is all that is left to do with it
            os.close(self.fd)
