"""The daemon's backend over real QEMU guests, whatever they come from.

The VMs and their settings come from a :class:`~balloonist.daemon.vm_source.VmSource`:
a state directory (``vm start``/``vm attach``) or a libvirt connection. Each period
the source is read again (VMs started or stopped while the daemon runs are picked
up), and the live changes operators made are laid on top. A live change is also kept
where the VM's settings live (``vm.json``, or the libvirt domain's metadata), so it
survives the daemon.

Guests run on their own, so there is nothing to settle after a period but the host's
page sharing (KSM, :mod:`balloonist.daemon.ksm_control`), which follows the VMs' free
memory as the host counts it; and nothing to restore on a restart: the pacer starts
every guest's target where the guest is (``daemon/pacing.py``, rule 3).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from balloonist.daemon.backend import BackendKind, GuestState, ResumePoint, merge_changes
from balloonist.daemon.config import DaemonConfig, budget_bytes
from balloonist.daemon.control import GuestChange
from balloonist.daemon.counters import Counts, FailureCounter
from balloonist.daemon.host_reclaim import CgroupHost
from balloonist.daemon.ksm_control import KsmClaim, KsmControl, KsmHost, KsmStatus
from balloonist.daemon.pacing import Bounds
from balloonist.daemon.qemu_hv import QemuHypervisor
from balloonist.daemon.vm_ports import VcpuHost, VmMemoryHost, VmPort
from balloonist.daemon.vm_source import VmSource, with_change
from balloonist.host import HostMemInfo
from balloonist.ksm import SysKernelKsm
from balloonist.model import GuestSpec
from balloonist.qemu.launcher import VMRecord
from balloonist.units import parse_size_bytes

log = logging.getLogger("balloonist.daemon")


class QemuBackend:
    def __init__(
        self,
        config: DaemonConfig,
        source: VmSource,
        *,
        clock: Callable[[], float],
        meminfo: Callable[[], HostMemInfo],
        connector: Callable[[VMRecord], VmPort] | None = None,
        vcpu_host: VcpuHost | None = None,
        memory_host: VmMemoryHost | None = None,
        ksm_host: KsmHost | None = None,
        ksm_claim: KsmClaim | None = None,
        cgroups: CgroupHost | None = None,
        on_target: Callable[[str, int], None] | None = None,
    ) -> None:
        """``ksm_host``: the kernel's KSM (``/sys/kernel/mm/ksm`` unless given);
        ``ksm_claim``: where the daemon keeps its claim on it while it manages it."""
        self.config = config
        self.source = source
        self._live: dict[str, GuestChange] = {}
        floor = parse_size_bytes(config.daemon.available_floor)
        self.hv = QemuHypervisor(
            self._records(),
            budget_bytes=budget_bytes(config, meminfo()),
            meminfo=meminfo,
            clock=clock,
            connector=connector or (lambda record: source.port(record, clock)),
            bounds_for=lambda r: Bounds(r.min_bytes, r.max_bytes, floor),
            stall_timeout_s=config.daemon.stall_timeout_s,
            on_target=on_target,
            period_s=config.daemon.period_s,
            processors=config.daemon.processor_ids,
            vcpu_host=vcpu_host or source.vcpu_host(),
            memory_host=memory_host,
            cgroups=cgroups,
            host_paging=config.daemon.host_paging,
        )
        ksm = config.ksm
        self.ksm_control = KsmControl(
            ksm_host or SysKernelKsm(), ksm.params(), enabled=ksm.mode == "auto", claim=ksm_claim
        )

    def _records(self) -> list[VMRecord]:
        records = self.source.records()
        names = {r.name for r in records}
        for gone in set(self._live) - names:
            del self._live[gone]  # a VM stopped and started again starts from its record
        return [
            r if (change := self._live.get(r.name)) is None else with_change(r, change)
            for r in records
        ]

    # -- Backend --------------------------------------------------------------------------

    @property
    def kind(self) -> BackendKind:
        return self.source.kind

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
        # Real guests run on their own; the host's page sharing follows their memory.
        truth = self.hv.last_reading.truth if self.hv.last_reading is not None else None
        self.ksm_control.step(None if truth is None else truth.free_fraction)

    def wait(self, seconds: float, stop: Callable[[], bool]) -> None:
        self.hv.serve(seconds, stop)

    def close(self) -> None:
        self.ksm_control.close()
        self.hv.close()
        self.source.close()

    def configured_specs(self) -> list[GuestSpec]:
        return [self.hv.configured_spec(r) for r in self.hv.records()]

    def capacity_bytes(self) -> int:
        return self.hv.budget_bytes

    def apply_change(self, name: str, change: GuestChange) -> None:
        """Keep the change where the VM's settings live and manage the VM with it."""
        managed = next((r for r in self.hv.records() if r.name == name), None)
        self.source.save_change(name, change, managed)
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
        return {**self.hv.counters(), FailureCounter.KSM_ERRORS: self.ksm_control.errors}

    def ksm(self) -> KsmStatus | None:
        return self.ksm_control.status()

    def guest_counters(self) -> dict[str, Counts]:
        return self.hv.guest_counters()


__all__ = ["QemuBackend"]
