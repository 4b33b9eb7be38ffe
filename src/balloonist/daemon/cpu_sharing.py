"""The QEMU adapter's CPU balloon: real VMs sharing the host processors it is given.

What to do is :mod:`balloonist.daemon.processors` (grants, demand, the order of the
two moves); this class does it, through each VM's :class:`~balloonist.daemon.
vm_ports.CpuBalloonPort` and the host's :class:`~balloonist.daemon.vm_ports.VcpuHost`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

from balloonist.agent.cpus import format_cpu_list
from balloonist.daemon.processors import VmProcessors, grants
from balloonist.daemon.vm_life import ManagedVm
from balloonist.daemon.vm_ports import CpuBalloonPort, VcpuHost
from balloonist.errors import BackendError, ConfigError
from balloonist.model import CpuSample, CpuSpec, GuestTarget
from balloonist.qemu.launcher import VMRecord

log = logging.getLogger("balloonist.daemon")


class ProcessorSharing:
    """Agent VMs with recorded vCPUs share ``processors`` through their CPU balloons."""

    def __init__(
        self, processors: Iterable[int], host: VcpuHost, clock: Callable[[], float]
    ) -> None:
        self.processors = tuple(processors)
        self._host = host
        self._clock = clock

    @staticmethod
    def spec(r: VMRecord) -> CpuSpec | None:
        """Its processors' spec, if they are shared: an agent VM we started, with its
        vCPUs recorded."""
        if not r.agent or r.cpus is None or r.pid is None:
            return None
        return CpuSpec(r.cpus, r.min_cpus, r.max_cpus, r.cpu_shares)

    async def sample(self, vm: ManagedVm) -> CpuSample | None:
        """Its processors this period: the balloon, and the demand from its threads."""
        r, spec = vm.record, self.spec(vm.record)
        balloon = vm.port.cpu_balloon if vm.port is not None else None
        if spec is None or r.pid is None or balloon is None:
            return None
        cpu = vm.cpu
        if cpu is None:
            cpu = vm.cpu = VmProcessors(vcpus=spec.vcpus)
        if cpu.threads is None:
            cpu.threads = await balloon.vcpu_threads()
        cpu.observe(self._host.cpu_s(r.name, r.pid, cpu.threads), self._clock())
        reserved = _reserved(balloon)
        return CpuSample(
            online_vcpus=spec.vcpus - reserved,
            balloon_vcpus=reserved,
            balloon_target_vcpus=cpu.sent_reserved,
            demand_vcpus=cpu.demand_vcpus,
        )

    async def apply(
        self,
        vms: Mapping[str, ManagedVm],
        wanted: Mapping[str, GuestTarget],
        failed: Callable[[ManagedVm, BackendError], None],
    ) -> None:
        """The CPU balloon targets and the affinity grants, in the order of
        :mod:`balloonist.daemon.processors`."""
        moving = {
            name: (vm, balloon, cpu, target.cpu)
            for name, vm in vms.items()
            if (target := wanted.get(name)) is not None
            and target.cpu is not None
            and (cpu := vm.cpu) is not None
            and vm.connected
            and vm.port is not None
            and (balloon := vm.port.cpu_balloon) is not None
        }
        granted = grants({n: m[3].allocation_cpus for n, m in moving.items()}, self.processors)
        every = frozenset(self.processors)
        for name, (vm, balloon, cpu, cpu_target) in moving.items():
            online_now = cpu.vcpus - _reserved(balloon)
            desired = cpu_target.balloon_vcpus
            try:
                if desired < cpu.sent_reserved:
                    # Giving processors back: room first, then the vCPUs.
                    grant = cpu.affinity_for(granted[name], cpu.vcpus - desired, every)
                    self._set_affinity(vm, cpu, grant)
                    await balloon.set_cpu_target(desired)
                else:
                    if desired != cpu.sent_reserved:
                        await balloon.set_cpu_target(desired)
                    self._set_affinity(vm, cpu, cpu.affinity_for(granted[name], online_now, every))
                cpu.sent_reserved = desired
            except BackendError as exc:
                failed(vm, exc)
            except ConfigError as exc:  # the policy keeps one vCPU: a bug if it asks for all
                log.error("%s: CPU balloon target not sent: %s", name, exc)

    def _set_affinity(self, vm: ManagedVm, cpu: VmProcessors, mask: frozenset[int]) -> None:
        pid = vm.record.pid
        assert cpu.threads is not None and pid is not None  # by sample()
        if mask == cpu.affinity:
            return
        self._host.narrow(vm.record.name, pid, cpu.threads, mask)
        cpu.affinity = mask
        log.info("%s: vCPU threads on host processors %s", vm.record.name, format_cpu_list(mask))


def _reserved(balloon: CpuBalloonPort) -> int:
    report = balloon.cpu_report
    return len(report.reserved_vcpus) if report is not None else 0


__all__ = ["ProcessorSharing"]
