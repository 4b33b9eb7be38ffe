"""Host-level reclaim: for VMs a balloon cannot serve.

The patent and ESX keep host paging for guests a balloon cannot serve. The policy
allows it in the HARD and LOW host states, for guests without a cooperating balloon
(``Mechanisms.host_paging``; the demand policy never allows it for the others). For
each such VM with a memory cgroup of its own (:mod:`balloonist.cgroup`), the daemon
caps the cgroup at the VM's allocation plus what QEMU holds besides the guest's RAM,
so the host swaps the rest of the VM's pages out.

The other case is a limit a balloon serves badly: the demand policy's *limit paging*
(``policy/limitpaging.py``) may hold a cooperating VM at its limit with its balloon
deflated and the host paging it (``GuestTarget.host_capped``), where the guest's own
reclaim keeps none of a scan its limit cannot hold. It asks only for a VM whose
sample says ``host_cappable`` (:meth:`HostReclaim.paging_of`). The rules:

- **never a cooperating VM**, unless its target says ``host_capped``;
- **never below its minimum** (plus QEMU's own memory);
- **a step a period**: the cap falls by at most ``step_bytes`` below what the cgroup
  holds now, because writing a cap reclaims in the writer's context (a worker
  thread here) and a VM's pages should go out over periods, not in one stall;
- **never more than the host's swap can take**: the cap stays above what the cgroup
  holds less 90 % of the free swap, so reclaim never runs out of room;
- **lifted at once** when a decision no longer allows host paging (the host's state
  rose), the VM cooperates again, or it is no longer managed;
- **someone else's cap kept**: a cgroup's cap when the daemon first finds it (a
  libvirt domain's ``memtune`` hard limit, say) is never raised, and lifting puts it
  back. In the cgroups ``vm start`` makes there is no one else, so a cap found there
  was left by a daemon that was killed, and is lifted.

:func:`next_cap_bytes` is the rule, pure; :class:`HostReclaim` applies it through the
:class:`CgroupHost` port (:class:`SysCgroups` for real, a fake in tests).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Protocol

from balloonist.cgroup import (
    MemoryCgroup,
    MemoryHierarchy,
    cgroup_of_process,
    host_memory_hierarchy,
)
from balloonist.daemon.vm_life import ManagedVm
from balloonist.errors import BackendError
from balloonist.model import Decision, GuestSpec, HostHeld, HostReading
from balloonist.qemu.launcher import VMRecord
from balloonist.units import MIB, format_size

log = logging.getLogger("balloonist.daemon")

#: How far a cap may fall below what the cgroup holds, per period.
DEFAULT_STEP_BYTES: Final = 64 * MIB
#: The share of the host's free swap one period's cap may send there.
SWAP_HEADROOM: Final = 0.9


class VmCgroup(Protocol):
    """One VM's memory cgroup (:class:`balloonist.cgroup.MemoryCgroup`)."""

    @property
    def name(self) -> str: ...

    def set_limit(self, limit_bytes: int | None) -> None: ...

    def limit_bytes(self) -> int | None: ...

    def usage_bytes(self) -> int: ...

    def swapped_bytes(self) -> int | None: ...


class CgroupHost(Protocol):
    """Finds a VM's memory cgroup: None if it has none of its own, which is then
    never capped (a cap on a shared cgroup would take other processes' memory)."""

    def cgroup(self, record: VMRecord) -> VmCgroup | None: ...


class SysCgroups:
    """The real :class:`CgroupHost`: the cgroup recorded for a VM balloonist started,
    else its QEMU process's own memory cgroup if that holds nothing else (a libvirt
    domain's, under ``machine``)."""

    def __init__(
        self, hierarchy: MemoryHierarchy | None = None, proc: Path = Path("/proc")
    ) -> None:
        self._hierarchy = hierarchy if hierarchy is not None else host_memory_hierarchy(proc)
        self._proc = proc

    def cgroup(self, record: VMRecord) -> VmCgroup | None:
        h = self._hierarchy
        if h is None or record.pid is None:
            return None
        if record.cgroup is not None:
            return MemoryCgroup(Path(record.cgroup), h.version)
        found = cgroup_of_process(record.pid, h, self._proc)
        if found is None:
            return None
        try:
            procs = (found.path / "cgroup.procs").read_text(encoding="ascii").split()
        except OSError:
            return None
        return found if procs == [str(record.pid)] else None


def next_cap_bytes(
    goal_bytes: int, usage_bytes: int, *, step_bytes: int, swap_free_bytes: int
) -> int:
    """The cap for this period: toward ``goal_bytes`` from what the cgroup holds now,
    by at most ``step_bytes``, and never sending more than :data:`SWAP_HEADROOM` of
    the free swap out. Never below the goal."""
    floor = usage_bytes - min(step_bytes, int(swap_free_bytes * SWAP_HEADROOM))
    return max(goal_bytes, floor)


@dataclass
class _Capped:
    cgroup: VmCgroup
    found_bytes: int | None  # the cap it had when first found, put back when lifted
    cap_bytes: int | None = None
    usage_bytes: int | None = None
    swapped_bytes: int | None = None


class HostReclaim:
    """Caps the cgroups of VMs whose balloon does not work, in HARD and LOW; with
    ``enabled`` False (``[daemon] host_paging = false``) it never caps one."""

    def __init__(
        self, host: CgroupHost, *, enabled: bool = True, step_bytes: int = DEFAULT_STEP_BYTES
    ) -> None:
        if step_bytes <= 0:
            raise ValueError(f"step must be positive, got {step_bytes}")
        self._host = host
        self._enabled = enabled
        self._step_bytes = step_bytes
        self._vms: dict[str, _Capped | None] = {}  # None: no cgroup of its own
        self._allowed = False  # whether the last decision allowed host paging
        self._swap_bytes = 0  # the host's swap, as the last period read it
        self.errors = 0  # cgroup reads or writes that failed, cumulative

    def paging_of(self, vm: ManagedVm, host: HostHeld | None) -> tuple[HostHeld | None, bool]:
        """What host paging says of the VM for its sample: what the host counts it
        holds (``host``), with its cap and swap as the last period left them (the cap
        balloonist's only: one someone else set is not host paging's); and whether
        the host could hold it to its allocation by paging it (``host_cappable``):
        host paging is on, the VM has a cgroup of its own and the host had swap at
        the last period."""
        cappable = self._swap_bytes > 0 and self._entry(vm) is not None
        c = self._vms.get(vm.record.name)
        if host is None or c is None:
            return host, cappable
        cap = None if c.cap_bytes == c.found_bytes else c.cap_bytes
        return replace(host, cap_bytes=cap, swapped_bytes=c.swapped_bytes), cappable

    def spec_for(self, vm: ManagedVm, configured: GuestSpec) -> GuestSpec:
        """The VM's spec for the policy: held where it is if uncooperative
        (:meth:`ManagedVm.held_spec`), unless the host may page it now. Then it is as
        configured, without a balloon, so the policy may give it less than it holds."""
        if self._allowed and not vm.cooperative and self._entry(vm) is not None:
            return replace(configured, balloon=False)
        return vm.held_spec(configured)

    async def apply(
        self, vms: Iterable[ManagedVm], decision: Decision, reading: HostReading | None
    ) -> None:
        """Cap or release every VM's cgroup for this decision (see the module's rules);
        ``reading``: the host as this period read it (its free swap)."""
        self._allowed = decision.mechanisms.host_paging
        self._swap_bytes = 0 if reading is None else reading.swap_bytes
        swap_free_bytes = 0 if reading is None else reading.swap_bytes - reading.swap_used_bytes
        wanted = decision.by_name()
        managed = {vm.record.name: vm for vm in vms}
        for gone in set(self._vms) - set(managed):
            entry = self._vms.pop(gone)
            if entry is not None and entry.cap_bytes != entry.found_bytes:
                await self._set(gone, entry, entry.found_bytes)
        swap_left = swap_free_bytes
        for name, vm in managed.items():
            entry = self._entry(vm)
            if entry is None:
                continue
            await self._read(name, entry)
            target = wanted.get(name)
            usage = entry.usage_bytes
            cap = entry.found_bytes
            paged = target is not None and (
                target.host_capped or (self._allowed and not vm.cooperative)
            )
            if target is not None and paged and usage is not None:
                overhead = (vm.host.overhead_bytes if vm.host is not None else None) or 0
                goal = max(target.allocation_bytes, vm.record.min_bytes) + overhead
                cap = next_cap_bytes(
                    goal, usage, step_bytes=self._step_bytes, swap_free_bytes=swap_left
                )
                if entry.found_bytes is not None:
                    cap = min(cap, entry.found_bytes)
                swap_left -= max(0, usage - cap)
            if cap != entry.cap_bytes:
                await self._set(name, entry, cap)
                await self._read(name, entry)  # the figures as this period leaves them

    async def release_all(self) -> None:
        """Lift every cap (the daemon is stopping)."""
        for name, entry in self._vms.items():
            if entry is not None and entry.cap_bytes != entry.found_bytes:
                await self._set(name, entry, entry.found_bytes)

    def _entry(self, vm: ManagedVm) -> _Capped | None:
        name = vm.record.name
        if not self._enabled:
            return None
        if name not in self._vms:
            self._vms[name] = self._find(vm)
        return self._vms[name]

    def _find(self, vm: ManagedVm) -> _Capped | None:
        name = vm.record.name
        cgroup = self._host.cgroup(vm.record)
        if cgroup is None:
            log.info("%s: no memory cgroup of its own; never paged by the host", name)
            return None
        try:
            found = cgroup.limit_bytes()
        except BackendError as exc:
            self.errors += 1
            log.warning("%s: reading its cgroup: %s; never paged by the host", name, exc)
            return None
        if vm.record.cgroup is not None:  # ours: a cap there is a killed daemon's
            return _Capped(cgroup, None, cap_bytes=found)
        return _Capped(cgroup, found, cap_bytes=found)

    async def _read(self, name: str, entry: _Capped) -> None:
        try:
            entry.usage_bytes = await asyncio.to_thread(entry.cgroup.usage_bytes)
            entry.swapped_bytes = await asyncio.to_thread(entry.cgroup.swapped_bytes)
        except BackendError as exc:
            self.errors += 1
            entry.usage_bytes = None
            log.warning("%s: reading its cgroup: %s", name, exc)

    async def _set(self, name: str, entry: _Capped, cap_bytes: int | None) -> None:
        try:
            await asyncio.to_thread(entry.cgroup.set_limit, cap_bytes)
        except BackendError as exc:
            self.errors += 1
            log.warning("%s: capping its cgroup: %s", name, exc)
            return
        if cap_bytes == entry.found_bytes:
            log.info("%s: host paging lifted", name)
        elif cap_bytes is not None and entry.cap_bytes == entry.found_bytes:
            log.warning("%s: paged by the host, capped at %s", name, format_size(cap_bytes))
        entry.cap_bytes = cap_bytes


__all__ = [
    "DEFAULT_STEP_BYTES",
    "CgroupHost",
    "HostReclaim",
    "SysCgroups",
    "VmCgroup",
    "next_cap_bytes",
]
