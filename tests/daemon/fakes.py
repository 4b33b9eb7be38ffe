"""Fakes for the daemon's tests: VM ports that follow their targets, and a daemon over
them with a fake clock and host (no QEMU)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from balloonist.daemon.service import Daemon, DaemonConfig
from balloonist.daemon.vm_ports import CpuBalloonPort
from balloonist.errors import FatalBackendError, TransientBackendError
from balloonist.host import HostMemInfo
from balloonist.ksm import KsmKnobs, KsmTotals
from balloonist.model import HostHeld
from balloonist.qemu.launcher import StateDir, VMRecord
from balloonist.qemu.qmp import GuestStats
from balloonist.units import GIB, MIB

HOST = HostMemInfo(8 * GIB, 6 * GIB, 0, 0)


@dataclass
class FakeVm:
    """A guest whose balloon follows its target at ``speed`` bytes per read."""

    memory: int
    actual: int
    used: int = 100 * MIB
    speed: int = 1 << 40
    fail_next: int = 0
    fatal: bool = False
    target: int | None = None
    connects: int = 0
    targets: list[int] = field(default_factory=list)

    async def connect(self) -> None:
        self.connects += 1
        if self.fail_next:
            self.fail_next -= 1
            raise TransientBackendError("socket not there")

    async def close(self) -> None:
        pass

    def release(self) -> None:
        pass

    cooperative = True
    rejected_messages = 0

    @property
    def cpu_balloon(self) -> CpuBalloonPort | None:
        return None

    async def set_target(self, guest_bytes: int) -> None:
        self.target = guest_bytes
        self.targets.append(guest_bytes)

    async def actual_bytes(self) -> int:
        if self.fatal:
            raise FatalBackendError("fake: the VM has no balloon device")
        if self.target is not None:
            delta = self.target - self.actual
            self.actual += max(-self.speed, min(self.speed, delta))
        return self.actual

    async def enable_stats(self, interval_s: int) -> None:
        pass

    async def guest_stats(self) -> GuestStats:
        return GuestStats(
            last_update_s=1,
            total_bytes=self.memory,
            available_bytes=max(0, self.actual - self.used),
            major_faults=0,
        )


def record(
    name: str, memory: int = 2 * GIB, lo: int = 256 * MIB, hi: int | None = None
) -> VMRecord:
    return VMRecord(
        name=name,
        memory_bytes=memory,
        min_bytes=lo,
        max_bytes=hi or memory,
        shares=1000,
        qmp_socket=f"/nonexistent/{name}.sock",
        serial_log=None,
        pid=None,
        accel=None,
        started_by_us=False,
    )


@dataclass
class FakeMemoryHost:
    """The host's count of what each VM holds, by QEMU pid: ``counts[pid]``."""

    counts: dict[int, HostHeld]
    asked: list[tuple[int, int, str | None]] = field(default_factory=list)

    def held(self, pid: int, memory_bytes: int, ram_file: str | None) -> HostHeld | None:
        self.asked.append((pid, memory_bytes, ram_file))
        return self.counts.get(pid)


@dataclass
class FakeKsm:
    """The kernel's KSM: knobs anyone may set (``knobs_now``), totals, and what
    balloonist wrote (``written``); ``refuse`` makes writes fail as for a non-root user."""

    knobs_now: KsmKnobs = field(default_factory=lambda: KsmKnobs(0, 100, 20))
    totals_now: KsmTotals = field(default_factory=lambda: KsmTotals(0, 0, 0, None))
    present: bool = True
    refuse: bool = False
    unreadable: bool = False
    written: list[KsmKnobs] = field(default_factory=list)

    def available(self) -> bool:
        return self.present

    def knobs(self) -> KsmKnobs:
        if self.unreadable:
            raise TransientBackendError("cannot read /sys/kernel/mm/ksm/run")
        return self.knobs_now

    def set_knobs(self, knobs: KsmKnobs) -> None:
        if self.refuse:
            raise FatalBackendError("cannot write /sys/kernel/mm/ksm/run: permission denied")
        self.written.append(knobs)
        self.knobs_now = knobs

    def totals(self) -> KsmTotals:
        return self.totals_now


@dataclass
class FakeCgroup:
    """A VM's memory cgroup: what it holds comes down to its cap at once, the rest
    going to swap; ``refuse`` makes writes fail as v1 does when it cannot reclaim."""

    name: str
    usage: int
    swapped: int = 0
    cap: int | None = None
    refuse: bool = False
    caps: list[int | None] = field(default_factory=list)

    def set_limit(self, limit_bytes: int | None) -> None:
        if self.refuse:
            raise TransientBackendError(f"{self.name}: could not reclaim down to it")
        self.caps.append(limit_bytes)
        self.cap = limit_bytes
        if limit_bytes is not None and self.usage > limit_bytes:
            self.swapped += self.usage - limit_bytes
            self.usage = limit_bytes

    def limit_bytes(self) -> int | None:
        return self.cap

    def usage_bytes(self) -> int:
        return self.usage

    def swapped_bytes(self) -> int | None:
        return self.swapped


@dataclass
class FakeCgroups:
    """Each VM's cgroup by name; a VM missing has none of its own."""

    by_name: dict[str, FakeCgroup]

    def cgroup(self, record: VMRecord) -> FakeCgroup | None:
        return self.by_name.get(record.name)


def make(
    tmp_path: Path,
    vms: dict[str, FakeVm],
    budget: str = "3GiB",
    host: HostMemInfo = HOST,
    period_s: float = 1.0,
    memory_host: FakeMemoryHost | None = None,
    ksm: FakeKsm | None = None,
    ksm_table: dict[str, object] | None = None,
    cgroups: FakeCgroups | None = None,
    daemon_table: dict[str, object] | None = None,
    cgroup_of_ours: bool = False,
) -> Daemon:
    """A daemon over ``vms``; with ``memory_host``, the i-th VM's QEMU has pid 1000 + i;
    ``cgroup_of_ours``: each VM's record names a cgroup, as ``vm start`` makes."""
    state = StateDir(tmp_path)
    for i, (name, vm) in enumerate(vms.items()):
        pid = None if memory_host is None else 1000 + i
        # A cgroup recorded, as for VMs `vm start` made one for.
        cgroup = f"/sys/fs/cgroup/memory/balloonist/{name}" if cgroup_of_ours else None
        state.save(replace(record(name, vm.memory), pid=pid, cgroup=cgroup))
    config = DaemonConfig.model_validate(
        {
            "daemon": {"budget": budget, "period_s": period_s, **(daemon_table or {})},
            "ksm": ksm_table or {},
        }
    )
    t = iter(range(10**6))
    return Daemon(
        config,
        state,
        clock=lambda: float(next(t)),
        meminfo=lambda: host,
        connector=lambda r: vms[r.name],
        memory_host=memory_host,
        ksm_host=ksm,
        cgroups=cgroups or FakeCgroups({}),
    )
