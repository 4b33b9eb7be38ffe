"""Where the daemon's real VMs come from: the ``VmSource`` port.

A source says which VMs to manage and with what settings (each period, so VMs that
appear or go are picked up), keeps an operator's change where the VM's settings live,
and makes the port that drives one VM's balloon. Everything else (the scheduler,
pacing, the safety rules, the state file, the API) is the same whatever the source:
:class:`~balloonist.daemon.qemu_backend.QemuBackend` runs it over one.

Two adapters: :class:`StateDirVms` here (the VMs ``balloonist vm start``/``attach``
recorded in a state directory, settings in their ``vm.json`` with host.toml's
``[vms.NAME]`` on top) and :class:`~balloonist.libvirt.source.LibvirtVms` (libvirt
domains that opted in, settings in the domain's own XML metadata).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Literal, Protocol

from balloonist.daemon.config import DaemonConfig, with_overrides
from balloonist.daemon.control import GuestChange
from balloonist.daemon.qemu_hv import vm_port
from balloonist.daemon.vm_ports import ProcVcpuHost, VcpuHost, VmPort
from balloonist.errors import BalloonistError
from balloonist.qemu.launcher import StateDir, VMRecord

log = logging.getLogger("balloonist.daemon")

SourceKind = Literal["qemu", "libvirt"]


def with_change(record: VMRecord, change: GuestChange) -> VMRecord:
    return replace(
        record,
        min_bytes=record.min_bytes if change.min_bytes is None else change.min_bytes,
        max_bytes=record.max_bytes if change.max_bytes is None else change.max_bytes,
        shares=record.shares if change.shares is None else change.shares,
        min_cpus=record.min_cpus if change.min_cpus is None else change.min_cpus,
        max_cpus=record.max_cpus if change.max_cpus is None else change.max_cpus,
        cpu_shares=record.cpu_shares if change.cpu_shares is None else change.cpu_shares,
    )


class VmSource(Protocol):
    """The VMs to manage, their settings, and a port to each."""

    @property
    def kind(self) -> SourceKind: ...

    def records(self) -> list[VMRecord]:
        """The VMs to manage now, with their settings as configured. A VM that cannot
        be read is logged and left out, never an error for the others."""
        ...

    def save_change(self, name: str, change: GuestChange, managed: VMRecord | None) -> None:
        """Keep ``change`` where the VM's settings live. ``managed``: the VM as managed
        now (settings from every layer), which the change was checked against."""
        ...

    def port(self, record: VMRecord, clock: Callable[[], float]) -> VmPort: ...

    def vcpu_host(self) -> VcpuHost:
        """The host's side of the VMs' vCPU threads, for the CPU balloon."""
        ...

    def close(self) -> None: ...


class StateDirVms:
    """The VMs recorded in a state directory (``vm.json``), host.toml on top."""

    def __init__(self, state: StateDir, config: DaemonConfig) -> None:
        self.state = state
        self.config = config

    @property
    def kind(self) -> SourceKind:
        return "qemu"

    def records(self) -> list[VMRecord]:
        records = []
        for name in self.state.names():
            try:
                records.append(with_overrides(self.state.load(name), self.config))
            except BalloonistError as exc:
                log.error("%s: %s; skipped", name, exc)
        return records

    def save_change(self, name: str, change: GuestChange, managed: VMRecord | None) -> None:
        """Record the change in ``vm.json`` (atomically), so ``vm list`` shows it."""
        raw = self.state.load(name)
        updated = with_change(raw, change)
        if updated.min_bytes > updated.max_bytes:
            # The change was checked against the VM as managed, with host.toml's
            # overrides; record both bounds as managed now, so vm.json stays consistent.
            after = with_change(managed or raw, change)
            updated = replace(updated, min_bytes=after.min_bytes, max_bytes=after.max_bytes)
        if updated != raw:
            self.state.save(updated)

    def port(self, record: VMRecord, clock: Callable[[], float]) -> VmPort:
        return vm_port(record, clock)

    def vcpu_host(self) -> VcpuHost:
        return ProcVcpuHost()

    def close(self) -> None:
        pass


__all__ = ["SourceKind", "StateDirVms", "VmSource", "with_change"]
