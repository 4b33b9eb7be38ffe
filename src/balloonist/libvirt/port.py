"""One libvirt domain's balloon, as the daemon drives it: a ``VmPort`` adapter.

It asks libvirt, never QEMU behind libvirt's back: ``memoryStats()`` for the balloon's
size and the guest's statistics, ``setMemoryStatsPeriod`` for how often the guest
reports them, and ``setMemoryFlags(..., VIR_DOMAIN_AFFECT_LIVE)`` to move the balloon
(the domain's persistent ``<currentMemory>`` is left as the administrator set it).
libvirt's calls block, so each runs in a worker thread.

libvirt reports the statistics in KiB under its own names; they are mapped onto the
same :class:`~balloonist.qemu.qmp.GuestStats` the QMP path gives, so the daemon reads
both the same way. The guest's figures are untrusted: anything negative or absurd is
dropped, as on the QMP path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final, TypeVar

from balloonist.daemon.processors import threads_cpu_s
from balloonist.errors import FatalBackendError
from balloonist.libvirt.connection import Libvirt
from balloonist.libvirt.domain_xml import virtio_mem_device
from balloonist.libvirt.process import vcpu_threads
from balloonist.qemu.qmp import MAX_GUEST_FIGURE, GuestStats
from balloonist.qemu.virtio_mem import requested_bytes
from balloonist.units import KIB, MIB, PAGE_SIZE_BYTES, format_size

T = TypeVar("T")

log = logging.getLogger("balloonist.daemon")

#: A balloon is at balloonist's target within this (the driver and QEMU round to
#: pages, guests differently; as the pacer's ``REACHED_TOLERANCE_BYTES``).
AT_TARGET_BYTES: Final = 4 * MIB

#: libvirt's memoryStats() keys (KiB unless said) -> GuestStats fields, and the factor
#: to our unit. libvirt's names are its own: "available" is the guest's total memory,
#: "usable" is what Linux calls MemAvailable, "unused" is MemFree.
_STATS: Final[Mapping[str, tuple[str, float]]] = {
    "available": ("total_bytes", KIB),
    "usable": ("available_bytes", KIB),
    "unused": ("free_bytes", KIB),
    "disk_caches": ("disk_caches_bytes", KIB),
    "major_fault": ("major_faults", 1),
    "minor_fault": ("minor_faults", 1),
    "swap_in": ("swap_in_pages", KIB / PAGE_SIZE_BYTES),
    "swap_out": ("swap_out_pages", KIB / PAGE_SIZE_BYTES),
}


def guest_stats_from(raw: Mapping[str, Any]) -> GuestStats:
    """libvirt's ``memoryStats()`` as :class:`GuestStats`; bad figures become None."""
    values: dict[str, int | None] = {}
    for key, (field, factor) in _STATS.items():
        value = raw.get(key)
        ok = isinstance(value, int) and not isinstance(value, bool)
        converted = int(value * factor) if ok and value is not None else -1
        # the QMP path's bound, on the figure in our unit
        values[field] = converted if 0 <= converted <= MAX_GUEST_FIGURE else None
    update = raw.get("last_update")
    ok = isinstance(update, int) and not isinstance(update, bool)
    last = update if ok and update is not None and 0 <= update <= MAX_GUEST_FIGURE else 0
    return GuestStats(last_update_s=last, **values)


def driver_seen(raw: Mapping[str, Any]) -> bool | None:
    """Whether the guest's balloon driver has ever reported, from ``memoryStats()``:
    QEMU stamps ``last_update`` when the driver hands over its first statistics, as it
    loads, whatever the statistics period; a guest without the driver leaves it at 0.
    None when libvirt gives no stamp at all, and so cannot tell."""
    update = raw.get("last_update")
    if not isinstance(update, int) or isinstance(update, bool):
        return None
    return update > 0


class DomainBalloon:
    """The balloon of the domain called ``name``, through libvirt."""

    def __init__(self, libvirt: Libvirt, name: str) -> None:
        self.libvirt = libvirt
        self.name = name
        self._lib = libvirt.lib
        # memoryStats() gives the balloon's size and the guest's statistics at once:
        # the reply actual_bytes() fetched serves the guest_stats() call that follows.
        self._unread: dict[str, Any] | None = None
        self._target_bytes: int | None = None
        self._at_target = False  # it came to rest there (see _follow_moves)
        self._reads_at_target = 0  # reads in a row that found it there
        self.moved_elsewhere = 0  # times it left the target without balloonist asking

    async def _on_domain(self, what: Callable[[Any], T]) -> T:
        return await asyncio.to_thread(self.libvirt.domain_call, self.name, what)

    async def connect(self) -> None:
        """Check the domain runs and has a balloon libvirt can read."""
        await self.actual_bytes()

    async def close(self) -> None:
        """The connection is the source's, shared by every domain: nothing to close."""

    def release(self) -> None:
        """Nothing is held beyond the shared connection."""

    @property
    def cooperative(self) -> bool:
        # As for QMP: the guest kernel's driver cannot die apart from the guest; whether
        # it keeps up is the pacer's to judge.
        return True

    @property
    def rejected_messages(self) -> int:
        return 0  # no guest talks to us here

    @property
    def cpu_balloon(self) -> None:
        return None

    async def set_target(self, guest_bytes: int) -> None:
        """Ask the guest to keep ``guest_bytes`` (libvirt rounds to KiB)."""
        if guest_bytes <= 0:
            raise ValueError(f"balloon target must be positive, got {guest_bytes}")
        live = self._lib.VIR_DOMAIN_AFFECT_LIVE
        await self._on_domain(lambda d: d.setMemoryFlags(guest_bytes // KIB, live))
        if guest_bytes != self._target_bytes:
            self._follow_moves()  # the moves so far were towards the previous target
            self._target_bytes = guest_bytes
            self._at_target = False
            self._reads_at_target = 0

    def _follow_moves(self) -> None:
        """Read the balloon-change events in order: once the balloon has come to rest
        at the target, a move away from it is not balloonist's (``virsh setmem``, or
        the guest deflating on OOM). Said once each time, so an administrator learns
        that balloonist, not ``virsh setmem``, decides this domain's balloon.

        It has come to rest when an event puts it at the target, or when two reads in
        a row find it there (a balloon that never had to move sends no event): a
        period apart, longer than QEMU holds back an event, so no older move can
        still be on its way."""
        events = self.libvirt.events
        if events is None:
            return
        target = self._target_bytes
        for kib in events.balloon_moves(self.name):
            if target is None:
                continue
            at_target = abs(kib * KIB - target) <= AT_TARGET_BYTES
            if not at_target:
                self._reads_at_target = 0
            if self._at_target and not at_target:
                self.moved_elsewhere += 1
                log.warning(
                    "%s: its balloon moved to %s, away from balloonist's target of %s, "
                    "by someone else (virsh setmem, or the guest deflating on OOM); "
                    "balloonist manages it: its limits are changed with balloonist set",
                    self.name,
                    format_size(kib * KIB),
                    format_size(target),
                )
            self._at_target = at_target

    async def actual_bytes(self) -> int:
        self._follow_moves()
        raw = await self._on_domain(lambda d: d.memoryStats())
        self._unread = raw if isinstance(raw, dict) else None
        actual = raw.get("actual") if isinstance(raw, dict) else None
        if not isinstance(actual, int) or actual <= 0:
            raise FatalBackendError(f"{self.name}: libvirt reports no balloon size")
        target = self._target_bytes
        if target is not None and abs(actual * KIB - target) <= AT_TARGET_BYTES:
            self._reads_at_target += 1
            self._at_target = self._at_target or self._reads_at_target >= 2
        else:
            self._reads_at_target = 0
        return actual * KIB

    async def enable_stats(self, interval_s: int) -> None:
        live = self._lib.VIR_DOMAIN_AFFECT_LIVE
        await self._on_domain(lambda d: d.setMemoryStatsPeriod(interval_s, live))

    async def guest_stats(self) -> GuestStats:
        raw, self._unread = self._unread, None
        if raw is None:
            raw = await self._on_domain(lambda d: d.memoryStats())
        return guest_stats_from(raw if isinstance(raw, dict) else {})


class DomainVirtioMem(DomainBalloon):
    """A domain resized through its virtio-mem device, through libvirt: a target is
    the device's ``<requested>`` size (``virDomainUpdateDeviceFlags``, live, as
    ``virsh update-memory-device`` does), and what the guest has is its boot memory
    plus the device's ``<current>`` size in the live XML. The balloon stays for the
    guest's statistics and is never moved. ``region_bytes``: the device's size."""

    def __init__(self, libvirt: Libvirt, name: str, region_bytes: int) -> None:
        super().__init__(libvirt, name)
        self.region_bytes = region_bytes

    async def set_target(self, guest_bytes: int) -> None:
        if guest_bytes <= 0:
            raise ValueError(f"target must be positive, got {guest_bytes}")
        root, boot = await self._live()
        device = virtio_mem_device(root)
        requested = device.find("target/requested") if device is not None else None
        if device is None or requested is None:
            raise FatalBackendError(f"{self.name}: no virtio-mem device to resize")
        size = requested_bytes(guest_bytes, boot, self.region_bytes)
        requested.text, requested.attrib = str(size // KIB), {"unit": "KiB"}
        xml = ET.tostring(device, encoding="unicode")
        live = self._lib.VIR_DOMAIN_AFFECT_LIVE
        await self._on_domain(lambda d: d.updateDeviceFlags(xml, live))

    async def actual_bytes(self) -> int:
        raw = await self._on_domain(lambda d: d.memoryStats())  # for guest_stats()
        self._unread = raw if isinstance(raw, dict) else None
        root, boot = await self._live()
        device = virtio_mem_device(root)
        current = device.find("target/current") if device is not None else None
        plugged = _kib_text(current)
        if plugged is None or plugged * KIB > self.region_bytes:
            raise FatalBackendError(f"{self.name}: libvirt reports no virtio-mem size")
        return boot + plugged * KIB

    async def _live(self) -> tuple[ET.Element, int]:
        """The live XML, and the boot memory (``<memory>`` less the device's size)."""
        xml = await self._on_domain(lambda d: d.XMLDesc(0))
        try:
            root = ET.fromstring(xml)
        except ET.ParseError as exc:
            raise FatalBackendError(f"{self.name}: live XML does not parse: {exc}") from None
        memory = _kib_text(root.find("memory"))
        if memory is None or memory * KIB <= self.region_bytes:
            raise FatalBackendError(f"{self.name}: live XML has no usable <memory>")
        return root, memory * KIB - self.region_bytes


def _kib_text(element: ET.Element | None) -> int | None:
    """An element's size in KiB (libvirt writes live sizes in KiB), or None."""
    if element is None or element.get("unit", "KiB") != "KiB":
        return None
    text = (element.text or "").strip()
    return int(text) if text.isdigit() and int(text) <= MAX_GUEST_FIGURE else None


class DomainControl:
    """An agent domain's ``GuestControl``: libvirt pauses it around a punch, and its
    QEMU process (``pid``) says which threads run its ``vcpus``."""

    def __init__(self, libvirt: Libvirt, name: str, pid: int, vcpus: int) -> None:
        self.libvirt = libvirt
        self.name = name
        self.pid = pid
        self.vcpus = vcpus

    async def connect(self) -> None:
        """The connection is the source's: nothing to open."""

    async def close(self) -> None:
        """Nothing to close."""

    @contextlib.asynccontextmanager
    async def frozen(self) -> AsyncIterator[None]:
        """The guest paused (``virDomainSuspend``) for the body, resumed after."""
        call = self.libvirt.domain_call
        await asyncio.to_thread(call, self.name, lambda d: d.suspend())
        try:
            yield
        finally:
            await asyncio.to_thread(call, self.name, lambda d: d.resume())

    async def vcpu_threads(self) -> dict[int, int]:
        threads = vcpu_threads(self.pid, self.vcpus)
        if not threads:
            raise FatalBackendError(f"{self.name}: no vCPU threads in QEMU process {self.pid}")
        return threads


class LibvirtVcpuHost:
    """The host's side of agent domains' vCPUs: CPU time from the threads' own
    accounting (``/proc``), processors pinned through libvirt (``pinVcpuFlags``), never
    behind libvirt's back, so ``virsh vcpupin`` shows what the CPU balloon did."""

    def __init__(self, libvirt: Libvirt) -> None:
        self.libvirt = libvirt

    def cpu_s(self, name: str, pid: int, threads: Mapping[int, int]) -> float:
        return threads_cpu_s(pid, threads)

    def narrow(
        self, name: str, pid: int, threads: Mapping[int, int], processors: frozenset[int]
    ) -> None:
        live = self.libvirt.lib.VIR_DOMAIN_AFFECT_LIVE

        def pin(dom: Any) -> None:
            host_cpus = dom.connect().getInfo()[2]
            cpumap = tuple(cpu in processors for cpu in range(host_cpus))
            for index in sorted(threads):
                dom.pinVcpuFlags(index, cpumap, live)

        self.libvirt.domain_call(name, pin)


__all__ = ["DomainBalloon", "DomainControl", "LibvirtVcpuHost", "driver_seen", "guest_stats_from"]
