"""The QMP adapter: one QEMU guest's balloon, over the ``qemu.qmp`` library (asyncio).

What it does: set the balloon target (QMP ``balloon``, whose value is the memory the
guest should keep, not the balloon size), read the actual size (``query-balloon`` and
``BALLOON_CHANGE`` events), switch on and read the guest's statistics (``qom-set
guest-stats-polling-interval``, ``qom-get guest-stats``), pause the guest around
work that must not race with it (``stop``/``cont``, for the agent's reclaim), and list
the vCPUs' host threads (``query-cpus-fast``, for the CPU balloon's affinity).

Errors from the library become ours:

- :class:`TransientBackendError`: the socket is not there yet, the connection dropped,
  a command timed out. Reconnecting may help.
- :class:`FatalBackendError`: QEMU answered, and the answer will not change (no
  balloon device, a command refused).

The guest's statistics come from the guest and are not trusted: each figure is
checked to be an integer within a bound; anything else is dropped, not guessed. The
vCPU list comes from QEMU, but is checked as strictly: it is what decides which host
threads get their affinity changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecuteError,
    QMPClient,
    QMPError,
    Runstate,
    StateError,
)
from qemu.qmp.message import Message

from balloonist.errors import FatalBackendError, TransientBackendError
from balloonist.units import PAGE_SIZE_BYTES

#: Default QOM path of the balloon device QEMU creates for ``-device
#: virtio-balloon-pci,id=balloon0`` (the id our launcher gives it).
BALLOON_QOM_PATH: Final = "/machine/peripheral/balloon0"
#: How long one QMP command may take before the connection is considered gone.
COMMAND_TIMEOUT_S: Final = 5.0
#: Largest figure accepted from a guest: 64 TiB in bytes, and as many faults as that.
MAX_GUEST_FIGURE: Final = 1 << 46
#: Most vCPUs a VM may list: QEMU 7.2 takes at most 255 on pc and 288 on q35.
MAX_VCPUS: Final = 1024
#: Linux thread ids are at most PID_MAX_LIMIT (2**22 on 64-bit).
MAX_THREAD_ID: Final = 1 << 22

_STAT_KEYS: Final = {
    "stat-total-memory": "total_bytes",
    "stat-available-memory": "available_bytes",
    "stat-free-memory": "free_bytes",
    "stat-disk-caches": "disk_caches_bytes",
    "stat-major-faults": "major_faults",
    "stat-minor-faults": "minor_faults",
    "stat-swap-in": "swap_in_pages",
    "stat-swap-out": "swap_out_pages",
}
#: The virtio spec gives swap-in and swap-out in bytes (Linux's driver sends
#: pages_to_bytes of its counters); faults are counts. Our fields count pages.
_BYTES_TO_PAGES: Final = frozenset({"stat-swap-in", "stat-swap-out"})


@dataclass(frozen=True)
class GuestStats:
    """The virtio-balloon statistics a guest last reported; None where it gave none."""

    last_update_s: int
    total_bytes: int | None = None
    available_bytes: int | None = None
    free_bytes: int | None = None
    disk_caches_bytes: int | None = None
    major_faults: int | None = None
    minor_faults: int | None = None
    swap_in_pages: int | None = None
    swap_out_pages: int | None = None
    #: Only from balloonist's agent (virtio-balloon has neither): seconds some task
    #: stalled on memory since boot (PSI), and the swap in use.
    stall_s: float | None = None
    swap_used_bytes: int | None = None


def parse_guest_stats(reply: Any) -> GuestStats:
    """Check a ``guest-stats`` reply field by field; bad or missing figures become None."""
    if not isinstance(reply, dict):
        raise FatalBackendError("guest-stats reply is not an object")
    raw = reply.get("stats")
    stats = raw if isinstance(raw, dict) else {}
    values = {field: _bounded(stats.get(key)) for key, field in _STAT_KEYS.items()}
    for key in _BYTES_TO_PAGES:
        value = values[_STAT_KEYS[key]]
        if value is not None:
            values[_STAT_KEYS[key]] = value // PAGE_SIZE_BYTES
    return GuestStats(last_update_s=_bounded(reply.get("last-update")) or 0, **values)


def parse_vcpu_threads(reply: Any) -> dict[int, int]:
    """Check a ``query-cpus-fast`` reply: cpu-index -> host thread id, sorted by index.

    Every entry must have a unique integer ``cpu-index`` below MAX_VCPUS and an integer
    ``thread-id`` in [1, MAX_THREAD_ID]; anything else refuses the whole reply (a wrong
    thread id would move some other thread's processors). vCPUs may share a thread:
    single-threaded TCG (``-accel tcg,thread=single``) runs them all in one.
    """
    if not isinstance(reply, list) or not 1 <= len(reply) <= MAX_VCPUS:
        what = f"a list of {len(reply)}" if isinstance(reply, list) else type(reply).__name__
        raise FatalBackendError(f"query-cpus-fast: expected 1 to {MAX_VCPUS} vCPUs, got {what}")
    threads: dict[int, int] = {}
    for entry in reply:
        fields = entry if isinstance(entry, dict) else {}
        index = _int_in(fields.get("cpu-index"), 0, MAX_VCPUS - 1)
        thread = _int_in(fields.get("thread-id"), 1, MAX_THREAD_ID)
        if index is None or thread is None:
            raise FatalBackendError(f"query-cpus-fast: unusable entry {str(entry)[:200]}")
        if index in threads:
            raise FatalBackendError(f"query-cpus-fast: vCPU {index} twice")
        threads[index] = thread
    return dict(sorted(threads.items()))


def _int_in(value: object, lo: int, hi: int) -> int | None:
    """``value`` if it is an integer (not a bool) in [lo, hi], else None."""
    if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi:
        return value
    return None


def _bounded(value: object) -> int | None:
    """An integer in [0, MAX_GUEST_FIGURE], or None (QEMU reports -1 for "never sent")."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_GUEST_FIGURE:
        return value
    return None


class BalloonQMP:
    """A connection to one VM's QMP socket, for its balloon.

    Use as ``async with BalloonQMP(path, name=...) as qmp:``, or call
    :meth:`connect` and :meth:`close`.
    """

    def __init__(self, socket_path: Path, *, name: str, timeout_s: float = COMMAND_TIMEOUT_S):
        self.socket_path = socket_path
        self.name = name
        self.timeout_s = timeout_s
        self._client = QMPClient(name)
        # The client's default listener takes every event and keeps it, queued and in
        # its history, for as long as the client lives: on a daemon's connection that
        # is a BALLOON_CHANGE a second while a balloon moves, for days. Nothing here
        # reads it; listeners made for a purpose (balloon_changes) still hear all.
        self._client.events.event_filter = _no_event

    async def __aenter__(self) -> BalloonQMP:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect and check there is a balloon device to drive."""
        if self._client.runstate != Runstate.IDLE:
            await self.close()  # a dropped connection not yet cleaned up
        try:
            await asyncio.wait_for(self._client.connect(str(self.socket_path)), self.timeout_s)
        except (ConnectError, OSError, TimeoutError) as exc:
            raise TransientBackendError(
                f"{self.name}: cannot connect to QMP at {self.socket_path}: {_reason(exc)}"
            ) from exc
        await self.actual_bytes()  # raises FatalBackendError without a balloon device

    async def close(self) -> None:
        with contextlib.suppress(QMPError):  # already gone: nothing left to close
            await self._client.disconnect()

    def release(self) -> None:
        """Nothing is held beyond the connection."""

    @property
    def cooperative(self) -> bool:
        # The guest kernel's driver cannot die apart from the guest; whether it keeps
        # up is the pacer's to judge.
        return True

    @property
    def rejected_messages(self) -> int:
        return 0  # QMP's answers are parsed strictly, but no guest talks on it

    @property
    def cpu_balloon(self) -> None:
        return None  # virtio-balloon has no CPU balloon

    @property
    def connected(self) -> bool:
        return self._client.runstate.name == "RUNNING"

    async def _execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), self.timeout_s)
        except ExecuteError as exc:
            if exc.error_class == "DeviceNotActive":
                raise FatalBackendError(f"{self.name}: the VM has no balloon device") from exc
            raise FatalBackendError(f"{self.name}: QMP refused {command}: {exc}") from exc
        except TimeoutError as exc:
            raise TransientBackendError(f"{self.name}: QMP {command} timed out") from exc
        except (StateError, QMPError, OSError, EOFError) as exc:
            raise TransientBackendError(
                f"{self.name}: QMP connection lost during {command}: {_reason(exc)}"
            ) from exc

    async def set_target(self, guest_bytes: int) -> None:
        """Ask the guest to keep ``guest_bytes`` of memory (QMP ``balloon``)."""
        if guest_bytes <= 0:
            raise ValueError(f"balloon target must be positive, got {guest_bytes}")
        await self._execute("balloon", {"value": guest_bytes})

    async def actual_bytes(self) -> int:
        """Memory the guest has now, outside the balloon (``query-balloon``)."""
        reply = await self._execute("query-balloon")
        actual = reply.get("actual") if isinstance(reply, dict) else None
        if not isinstance(actual, int) or isinstance(actual, bool) or actual < 0:
            raise FatalBackendError(f"{self.name}: query-balloon gave no usable size: {reply!r}")
        return actual

    async def base_memory_bytes(self) -> int:
        """The VM's configured RAM (``query-memory-size-summary``), balloon or not."""
        reply = await self._execute("query-memory-size-summary")
        base = reply.get("base-memory") if isinstance(reply, dict) else None
        if not isinstance(base, int) or isinstance(base, bool) or base <= 0:
            raise FatalBackendError(f"{self.name}: no usable base-memory in {reply!r}")
        return base

    async def enable_stats(self, interval_s: int, qom_path: str = BALLOON_QOM_PATH) -> None:
        """Have the guest driver report statistics every ``interval_s`` seconds."""
        await self._execute(
            "qom-set",
            {"path": qom_path, "property": "guest-stats-polling-interval", "value": interval_s},
        )

    async def guest_stats(self, qom_path: str = BALLOON_QOM_PATH) -> GuestStats:
        reply = await self._execute("qom-get", {"path": qom_path, "property": "guest-stats"})
        return parse_guest_stats(reply)

    async def vcpu_threads(self) -> dict[int, int]:
        """The VM's vCPUs: cpu-index -> the host thread that runs it (``query-cpus-fast``)."""
        return parse_vcpu_threads(await self._execute("query-cpus-fast"))

    @contextlib.asynccontextmanager
    async def frozen(self) -> AsyncIterator[None]:
        """Pause the guest's vCPUs for the body (QMP ``stop``/``cont``).

        A guest that was not running (paused by its user, or shutting down) is left
        as it was, and the body runs anyway.
        """
        status = await self._execute("query-status")
        running = isinstance(status, dict) and status.get("status") == "running"
        if running:
            await self._execute("stop")
        try:
            yield
        finally:
            if running:
                await self._execute("cont")

    @contextlib.asynccontextmanager
    async def balloon_changes(self) -> AsyncIterator[AsyncIterator[int]]:
        """Listen for ``BALLOON_CHANGE`` events; yields an iterator of actual sizes.

        The listener is in place when the ``async with`` body starts, so a target set
        inside it cannot race past its own events::

            async with qmp.balloon_changes() as changes:
                await qmp.set_target(target)
                async for actual in changes: ...
        """
        with self._client.listener("BALLOON_CHANGE") as listener:
            yield self._actual_sizes(listener)

    @staticmethod
    async def _actual_sizes(listener: EventListener) -> AsyncIterator[int]:
        async for event in listener:
            data = event.get("data")
            actual = _bounded(data.get("actual") if isinstance(data, dict) else None)
            if actual is not None:
                yield actual

    async def wait_actual(
        self, guest_bytes: int, *, timeout_s: float, tolerance_bytes: int = 0
    ) -> float:
        """Poll until the guest has ``guest_bytes`` (within tolerance); return seconds taken.

        Raises TransientBackendError if the deadline passes first.
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            actual = await self.actual_bytes()
            if math.isclose(actual, guest_bytes, abs_tol=tolerance_bytes):
                return loop.time() - start
            if loop.time() - start > timeout_s:
                raise TransientBackendError(
                    f"{self.name}: balloon at {actual} bytes, not {guest_bytes}, "
                    f"after {timeout_s:.0f} s"
                )
            await asyncio.sleep(0.1)


def _no_event(event: Message) -> bool:
    del event
    return False


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text if text else type(exc).__name__
