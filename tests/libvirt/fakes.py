"""A fake of the ``libvirt`` module, as much of it as balloonist calls: a connection
that can die, domains with XML, metadata, a balloon that follows its target, and
libvirt's errors with their codes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from balloonist.libvirt.connection import Libvirt

VIR_DOMAIN_AFFECT_LIVE = 1
VIR_DOMAIN_AFFECT_CONFIG = 2
VIR_DOMAIN_METADATA_ELEMENT = 2
VIR_CONNECT_LIST_DOMAINS_ACTIVE = 1
VIR_DOMAIN_XML_INACTIVE = 2
VIR_ERR_NO_DOMAIN = 42
VIR_ERR_OPERATION_INVALID = 55
VIR_ERR_SYSTEM_ERROR = 38
VIR_ERR_NO_DOMAIN_METADATA = 80
VIR_DOMAIN_EVENT_ID_LIFECYCLE = 0
VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE = 13
VIR_DOMAIN_EVENT_DEFINED = 0
VIR_DOMAIN_EVENT_STARTED = 2
VIR_DOMAIN_EVENT_STARTED_BOOTED = 0
VIR_DOMAIN_EVENT_STARTED_MIGRATED = 1
VIR_DOMAIN_EVENT_SUSPENDED = 3
VIR_DOMAIN_EVENT_STOPPED = 5
VIR_DOMAIN_EVENT_STOPPED_DESTROYED = 1
VIR_DOMAIN_EVENT_STOPPED_CRASHED = 2


class libvirtError(Exception):  # noqa: N801 (libvirt's own spelling)
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code

    def get_error_code(self) -> int:
        return self.code

    def get_error_message(self) -> str:
        return str(self)


@dataclass
class FakeDomain:
    label: str  # its name (libvirt's virDomain has a name() method)
    memory_kib: int
    balloon: str = "virtio"
    active: bool = True
    persistent: bool = True
    actual_kib: int | None = None
    metadata_xml: dict[int, str] = field(default_factory=dict)  # by AFFECT_* flag
    targets_kib: list[int] = field(default_factory=list)
    stats_period_s: int | None = None
    usable_kib: int = 400 * 1024
    extra_devices: str = ""
    pins: dict[int, tuple[bool, ...]] = field(default_factory=dict)  # vCPU -> cpumap
    stats_calls: int = 0
    #: QEMU's stamp of the driver's first report, advanced by one per call (a driver
    #: that reports every period); 0: none yet; None: libvirt gives no stamp
    last_update: int | None = 1234
    host_cpus: int = 4

    def connect(self) -> FakeConnection:
        return FakeConnection(FakeLibvirtModule(), host_cpus=self.host_cpus)

    def pinVcpuFlags(self, vcpu: int, cpumap: tuple[bool, ...], flags: int) -> int:  # noqa: N802
        self._running()
        assert flags == VIR_DOMAIN_AFFECT_LIVE
        self.pins[vcpu] = cpumap
        return 0

    def __post_init__(self) -> None:
        if self.actual_kib is None:
            self.actual_kib = self.memory_kib

    def _running(self) -> None:
        if not self.active:
            raise libvirtError("domain is not running", VIR_ERR_OPERATION_INVALID)

    def XMLDesc(self, flags: int) -> str:  # noqa: N802 (libvirt's names)
        meta = self.metadata_xml.get(
            VIR_DOMAIN_AFFECT_CONFIG if flags & VIR_DOMAIN_XML_INACTIVE else VIR_DOMAIN_AFFECT_LIVE,
            "",
        )
        if meta:
            meta = meta.replace(
                "<settings", "<balloonist:settings xmlns:balloonist='urn:balloonist:domain:1'", 1
            )
        return (
            f"<domain type='kvm'><name>{self.label}</name><metadata>{meta}</metadata>"
            f"<memory unit='KiB'>{self.memory_kib}</memory>"
            f"<devices><memballoon model='{self.balloon}'/>{self.extra_devices}</devices>"
            "</domain>"
        )

    def name(self) -> str:
        return self.label

    def isActive(self) -> int:  # noqa: N802
        return int(self.active)

    def isPersistent(self) -> int:  # noqa: N802
        return int(self.persistent)

    def metadata(self, kind: int, uri: str, flags: int) -> str:
        assert kind == VIR_DOMAIN_METADATA_ELEMENT and uri == "urn:balloonist:domain:1"
        if flags not in self.metadata_xml:
            raise libvirtError("metadata not found", VIR_ERR_NO_DOMAIN_METADATA)
        return self.metadata_xml[flags]

    def setMetadata(self, kind: int, xml: str, key: str, uri: str, flags: int) -> int:  # noqa: N802
        assert kind == VIR_DOMAIN_METADATA_ELEMENT and key == "balloonist"
        for flag in (VIR_DOMAIN_AFFECT_LIVE, VIR_DOMAIN_AFFECT_CONFIG):
            if flags & flag:
                self.metadata_xml[flag] = xml
        return 0

    def memoryStats(self) -> dict[str, int]:  # noqa: N802
        self._running()
        self.stats_calls += 1
        return {
            "actual": self.actual_kib or 0,
            "available": self.actual_kib or 0,
            "usable": self.usable_kib,
            "unused": self.usable_kib,
            "major_fault": 7,
            "swap_in": 8,  # KiB: two pages
            **({} if self.last_update is None else {"last_update": self._stamp()}),
        }

    def _stamp(self) -> int:
        assert self.last_update is not None
        return self.last_update + self.stats_calls if self.last_update else 0

    def setMemoryFlags(self, kib: int, flags: int) -> int:  # noqa: N802
        self._running()
        assert flags == VIR_DOMAIN_AFFECT_LIVE
        self.targets_kib.append(kib)
        self.actual_kib = kib  # a balloon that keeps up
        return 0

    def setMemoryStatsPeriod(self, period: int, flags: int) -> int:  # noqa: N802
        self._running()
        self.stats_period_s = period
        return 0


class FakeConnection:
    def __init__(self, lib: FakeLibvirtModule, host_cpus: int = 4) -> None:
        self.lib = lib
        self.alive = True
        self.host_cpus = host_cpus

    def domainEventRegisterAny(  # noqa: N802
        self, dom: object, event_id: int, callback: Callable[..., None], opaque: object
    ) -> int:
        if event_id == VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE:
            self.lib.balloon_callbacks.append(callback)
        else:
            assert event_id == VIR_DOMAIN_EVENT_ID_LIFECYCLE
            self.lib.lifecycle_callbacks.append(callback)
        return len(self.lib.lifecycle_callbacks) + len(self.lib.balloon_callbacks)

    def setKeepAlive(self, interval: int, count: int) -> int:  # noqa: N802
        return 0

    def getInfo(self) -> list[object]:  # noqa: N802
        return ["x86_64", 8192, self.host_cpus, 2000, 1, 1, self.host_cpus, 1]

    def _check(self) -> None:
        if not self.alive:
            raise libvirtError("Cannot write data: Broken pipe", VIR_ERR_SYSTEM_ERROR)

    def isAlive(self) -> int:  # noqa: N802
        return int(self.alive)

    def listAllDomains(self, flags: int) -> list[FakeDomain]:  # noqa: N802
        self._check()
        return [d for d in self.lib.domains.values() if d.active or not flags]

    def lookupByName(self, name: str) -> FakeDomain:  # noqa: N802
        self._check()
        if name not in self.lib.domains:
            raise libvirtError(f"no domain with matching name '{name}'", VIR_ERR_NO_DOMAIN)
        return self.lib.domains[name]

    def close(self) -> int:
        return 0


class FakeLibvirtModule:
    """Stands in for ``import libvirt``."""

    libvirtError = libvirtError  # noqa: N815 (libvirt's own spelling)

    def __init__(self, *domains: FakeDomain) -> None:
        for name, value in globals().items():
            if name.startswith("VIR_"):
                setattr(self, name, value)
        self.domains = {d.label: d for d in domains}
        self.connections: list[FakeConnection] = []
        self.reachable = True
        self.lifecycle_callbacks: list[Callable[..., None]] = []
        self.balloon_callbacks: list[Callable[..., None]] = []
        self.event_loop_runs = threading.Event()

    def virEventRegisterDefaultImpl(self) -> int:  # noqa: N802
        return 0

    def virEventRunDefaultImpl(self) -> int:  # noqa: N802
        self.event_loop_runs.set()
        time.sleep(0.05)
        return 0

    def fire(self, name: str, event: int, detail: int) -> None:
        """libvirt's event loop delivers a lifecycle event of domain ``name``."""
        dom = self.domains.get(name) or FakeDomain(name, 1024)
        for callback in self.lifecycle_callbacks:
            callback(None, dom, event, detail, None)

    def balloon_moves(self, name: str, *sizes_kib: int) -> None:
        """libvirt's event loop delivers balloon-change events of domain ``name``."""
        dom = self.domains.get(name) or FakeDomain(name, 1024)
        for kib in sizes_kib:
            for callback in self.balloon_callbacks:
                callback(None, dom, kib, None)

    def open(self, uri: str) -> FakeConnection:
        if not self.reachable:
            raise libvirtError("Failed to connect socket", VIR_ERR_SYSTEM_ERROR)
        conn = FakeConnection(self)
        self.connections.append(conn)
        return conn

    def restart(self) -> None:
        """libvirtd restarts: every open connection dies."""
        for conn in self.connections:
            conn.alive = False


def fake_libvirt(*domains: FakeDomain, events: bool = False) -> tuple[Libvirt, FakeLibvirtModule]:
    lib = FakeLibvirtModule(*domains)
    module: Any = lib
    return Libvirt("test:///fake", lib=module, events=events), lib
