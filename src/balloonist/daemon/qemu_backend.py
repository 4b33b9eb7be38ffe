"""The daemon's backend over real QEMU guests: the VMs recorded in a state directory.

Each period the records are read again (``vm start``/``vm stop`` while the daemon
runs are picked up), with the host configuration's ``[vms.NAME]`` overrides and then
the live changes operators made on top. A live change is also written into the VM's
``vm.json`` (atomically), so ``vm list`` shows it and it survives the daemon.

Guests run on their own, so there is nothing to settle after a period, and nothing
to restore on a restart: the pacer starts every guest's target where the guest is
(``daemon/pacing.py``, rule 3).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from balloonist.daemon.backend import BackendKind, GuestState, ResumePoint, merge_changes
from balloonist.daemon.config import DaemonConfig, budget_bytes, with_overrides
from balloonist.daemon.control import GuestChange
from balloonist.daemon.counters import Counts
from balloonist.daemon.pacing import Bounds
from balloonist.daemon.qemu_hv import QemuHypervisor
from balloonist.daemon.vm_ports import VcpuHost, VmPort
from balloonist.errors import BalloonistError
from balloonist.host import HostMemInfo
from balloonist.model import GuestSpec
from balloonist.qemu.launcher import StateDir, VMRecord
from balloonist.units import parse_size_bytes

log = logging.getLogger("balloonist.daemon")


def with_change(record: VMRecord, change: GuestChange) -> VMRecord:
    return replace(
        record,
        min_bytes=record.min_bytes if change.min_bytes is None else change.min_bytes,
        max_bytes=record.max_bytes if change.max_bytes is None else change.max_bytes,
        shares=record.shares if change.shares is None else change.shares,
        cpu_min=record.cpu_min if change.cpu_min is None else change.cpu_min,
        cpu_max=record.cpu_max if change.cpu_max is None else change.cpu_max,
        cpu_shares=record.cpu_shares if change.cpu_shares is None else change.cpu_shares,
    )


class QemuBackend:
    def __init__(
        self,
        config: DaemonConfig,
        state: StateDir,
        *,
        clock: Callable[[], float],
        meminfo: Callable[[], HostMemInfo],
        connector: Callable[[VMRecord], VmPort] | None = None,
        vcpu_host: VcpuHost | None = None,
        on_target: Callable[[str, int], None] | None = None,
    ) -> None:
        self.config = config
        self.state = state
        self._live: dict[str, GuestChange] = {}
        floor = parse_size_bytes(config.daemon.available_floor)
        self.hv = QemuHypervisor(
            self._records(),
            budget_bytes=budget_bytes(config, meminfo()),
            meminfo=meminfo,
            clock=clock,
            connector=connector,
            bounds_for=lambda r: Bounds(r.min_bytes, r.max_bytes, floor),
            stall_timeout_s=config.daemon.stall_timeout_s,
            on_target=on_target,
            period_s=config.daemon.period_s,
            processors=config.daemon.processor_ids,
            vcpu_host=vcpu_host,
        )

    def _records(self) -> list[VMRecord]:
        names = self.state.names()
        for gone in set(self._live) - set(names):
            del self._live[gone]  # a VM stopped and started again starts from its record
        records = []
        for name in names:
            try:
                record = with_overrides(self.state.load(name), self.config)
            except BalloonistError as exc:
                log.error("%s: %s; skipped", name, exc)
                continue
            change = self._live.get(name)
            records.append(record if change is None else with_change(record, change))
        return records

    # -- Backend --------------------------------------------------------------------------

    @property
    def kind(self) -> BackendKind:
        return "qemu"

    @property
    def hypervisor(self) -> QemuHypervisor:
        return self.hv

    @property
    def period_s(self) -> float:
        return self.config.daemon.period_s

    @property
    def wall_period_s(self) -> float:
        return self.config.daemon.period_s

    @property
    def resumes_estimates(self) -> bool:
        # Estimates saved before a restart are of unknown age to the guests, which ran
        # on meanwhile; the scheduler starts from what each guest holds instead.
        return False

    def refresh(self) -> None:
        self.hv.update_records(self._records())

    def settle(self) -> None:
        pass  # real guests run on their own

    def wait(self, seconds: float, stop: Callable[[], bool]) -> None:
        self.hv.serve(seconds, stop)

    def close(self) -> None:
        self.hv.close()

    def configured_specs(self) -> list[GuestSpec]:
        return [self.hv.configured_spec(r) for r in self.hv.records()]

    def capacity_bytes(self) -> int:
        return self.hv.budget_bytes

    def apply_change(self, name: str, change: GuestChange) -> None:
        """Record the change in ``vm.json`` and manage the VM with it from now on."""
        raw = self.state.load(name)
        updated = with_change(raw, change)
        if updated.min_bytes > updated.max_bytes:
            # The change was checked against the VM as managed, with host.toml's
            # overrides; record both bounds as managed now, so vm.json stays consistent.
            managed = next((r for r in self.hv.records() if r.name == name), raw)
            after = with_change(managed, change)
            updated = replace(updated, min_bytes=after.min_bytes, max_bytes=after.max_bytes)
        if updated != raw:
            self.state.save(updated)
        self._live[name] = merge_changes(self._live.get(name), change)
        self.hv.update_records(self._records())

    def time_s(self) -> float | None:
        return None

    def guest_states(self) -> dict[str, GuestState]:
        states = {}
        for record in self.hv.records():
            view = self.hv.view(record.name)
            if view is None or view.actual_bytes is None:
                continue  # not sampled this period
            sent = view.last_sent_bytes
            states[record.name] = GuestState(
                allocated_bytes=view.actual_bytes,
                balloon_bytes=record.memory_bytes - view.actual_bytes,
                balloon_target_bytes=None if sent is None else record.memory_bytes - sent,
            )
        return states

    def resume(self, point: ResumePoint) -> None:
        # Nothing to restore: the guests kept their memory, and the pacer starts each
        # one where it is. The saved targets are there for people and tools.
        pass

    def counters(self) -> Counts:
        return self.hv.counters()

    def guest_counters(self) -> dict[str, Counts]:
        return self.hv.guest_counters()


__all__ = ["QemuBackend", "with_change"]
