"""The ports the daemon drives real VMs through.

:class:`VmPort` is one VM's balloon: ``BalloonQMP`` for virtio-balloon VMs,
``AgentPort`` for VMs run through our agent, fakes in tests. A port that also drives
the VM's CPU balloon says so through :attr:`VmPort.cpu_balloon`, so the adapter never
has to ask what class a port is. :class:`VcpuHost` is the host's side of a VM's vCPU
threads (their CPU time, their affinity): ``/proc`` and ``sched_setaffinity`` here,
a fake in tests. :class:`VmMemoryHost` is the host's count of what a VM's QEMU process
holds (``/proc/PID/smaps`` here).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from balloonist.daemon.processors import threads_cpu_s
from balloonist.model import HostHeld
from balloonist.qemu.affinity import narrow_vcpu_affinity
from balloonist.qemu.host_memory import read_host_held
from balloonist.qemu.qmp import GuestStats


@runtime_checkable
class CpuBalloonPort(Protocol):
    """What the adapter needs of a VM whose CPU balloon it drives (``AgentPort``)."""

    @property
    def cpu_report(self) -> CpuReportLike | None: ...

    async def set_cpu_target(self, reserved_vcpus: int) -> None: ...

    async def vcpu_threads(self) -> dict[int, int]: ...


class CpuReportLike(Protocol):
    """The guest's last word on its vCPUs (``agent_link.CpuReport``)."""

    @property
    def reserved_vcpus(self) -> tuple[int, ...]: ...


class VmPort(Protocol):
    """What the adapter needs of one VM.

    A port lives as long as the VM is managed: ``connect`` and ``close`` may alternate
    (reconnects), and ``release`` ends it.
    """

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    def release(self) -> None: ...

    @property
    def cooperative(self) -> bool: ...

    @property
    def rejected_messages(self) -> int:
        """Messages the VM sent that were refused, cumulative (0 without an agent)."""
        ...

    @property
    def cpu_balloon(self) -> CpuBalloonPort | None:
        """Its CPU balloon, if it has one the daemon can drive."""
        ...

    async def set_target(self, guest_bytes: int) -> None: ...

    async def actual_bytes(self) -> int: ...

    async def enable_stats(self, interval_s: int) -> None: ...

    async def guest_stats(self) -> GuestStats: ...


class VcpuHost(Protocol):
    """The host's side of a VM's vCPU threads: VM ``name``, its QEMU ``pid``, and
    ``threads``, cpu-index -> thread id."""

    def cpu_s(self, name: str, pid: int, threads: Mapping[int, int]) -> float:
        """CPU seconds the threads have used, all together, since they started."""
        ...

    def narrow(
        self, name: str, pid: int, threads: Mapping[int, int], processors: frozenset[int]
    ) -> None:
        """Let the threads run only on ``processors``."""
        ...


class ProcVcpuHost:
    """The real :class:`VcpuHost` for VMs balloonist started: ``/proc/PID/task/TID/stat``
    and ``sched_setaffinity`` (libvirt domains are pinned through libvirt instead)."""

    def cpu_s(self, name: str, pid: int, threads: Mapping[int, int]) -> float:
        return threads_cpu_s(pid, threads)

    def narrow(
        self, name: str, pid: int, threads: Mapping[int, int], processors: frozenset[int]
    ) -> None:
        narrow_vcpu_affinity(pid, threads, processors)


class VmMemoryHost(Protocol):
    """The host's side of a VM's memory: what its QEMU process ``pid`` really holds,
    and of that its guest's RAM (``memory_bytes`` of it, in ``ram_file`` for an agent
    VM). None when the process cannot be read."""

    def held(self, pid: int, memory_bytes: int, ram_file: str | None) -> HostHeld | None: ...


class ProcVmMemory:
    """The real :class:`VmMemoryHost`: the process's ``/proc/PID/smaps``."""

    def held(self, pid: int, memory_bytes: int, ram_file: str | None) -> HostHeld | None:
        return read_host_held(pid, memory_bytes, ram_file)


__all__ = [
    "CpuBalloonPort",
    "CpuReportLike",
    "ProcVcpuHost",
    "ProcVmMemory",
    "VcpuHost",
    "VmMemoryHost",
    "VmPort",
]
