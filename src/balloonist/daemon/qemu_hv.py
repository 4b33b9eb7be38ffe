"""The scheduler's ``Hypervisor`` port over real QEMU guests.

One period, for every recorded VM: connect if needed, read the balloon's actual size
and the guest's statistics, and hand the scheduler a sample; then send each guest the
next paced, safety-checked target (:mod:`balloonist.daemon.pacing`).

**What the policy sees** (demand from guest statistics, samples of VMs that could not
be asked, the host's memory) is worked out in :mod:`balloonist.daemon.vm_figures`.

**Processors.** With ``processors`` given (``[daemon] processors``), agent VMs with
recorded vCPUs share them through their CPU balloons
(:class:`~balloonist.daemon.cpu_sharing.ProcessorSharing`).

**Host paging.** In the HARD and LOW states a VM whose balloon does not work is
capped through its memory cgroup, so the host swaps it
(:mod:`balloonist.daemon.host_reclaim`).

**Failures.** A VM whose QEMU has exited is dropped with one log line; one whose
socket does not answer is retried every period (reconnecting) and left out of the
cycle meanwhile; one without a balloon device is logged once and left alone. None of
these stops the others from being managed. A VM's life is one state
(:mod:`balloonist.daemon.vm_life`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from balloonist.daemon.agent_link import AgentPort, GuestControl
from balloonist.daemon.counters import Counts, FailureCounter
from balloonist.daemon.cpu_sharing import ProcessorSharing
from balloonist.daemon.host_reclaim import CgroupHost, HostReclaim, SysCgroups
from balloonist.daemon.pacing import DEFAULT_STALL_TIMEOUT_S, Bounds
from balloonist.daemon.vm_figures import HostMemory, host_memory, host_truth
from balloonist.daemon.vm_life import ManagedVm, VmFailures, VmLife, VmView
from balloonist.daemon.vm_ports import ProcVcpuHost, ProcVmMemory, VcpuHost, VmMemoryHost, VmPort
from balloonist.errors import BackendError, FatalBackendError
from balloonist.host import HostMemInfo
from balloonist.model import Decision, GuestSample, GuestSpec, HostReading
from balloonist.qemu.launcher import VMRecord
from balloonist.qemu.qmp import BalloonQMP
from balloonist.qemu.reclaim import GuestRam
from balloonist.qemu.virtio_mem import VirtioMemQMP
from balloonist.units import format_size

log = logging.getLogger("balloonist.daemon")

#: Guest statistics polling interval asked of each guest's driver, seconds.
STATS_INTERVAL_S = 1
#: How often ``serve`` checks whether to stop, seconds.
IDLE_SLICE_S = 0.1


def vm_port(record: VMRecord, clock: Callable[[], float]) -> VmPort:
    """The real port for a VM: through its agent if it has one, its virtio-mem device
    if it has one, else virtio-balloon."""
    if record.virtio_mem_bytes is not None:
        region = record.virtio_mem_bytes
        return VirtioMemQMP(
            Path(record.qmp_socket),
            name=record.name,
            boot_bytes=record.memory_bytes - region,
            region_bytes=region,
        )
    qmp = BalloonQMP(Path(record.qmp_socket), name=record.name)
    if record.agent_socket is None or record.ram_file is None:
        return qmp
    return agent_port(record, clock, qmp)


def agent_port(
    record: VMRecord, clock: Callable[[], float], control: GuestControl, *, vcpus: int | None = None
) -> AgentPort:
    """The port to an agent VM's agent: its socket, its RAM file, ``control`` to pause
    it around a punch (QMP, or libvirt for a domain)."""
    if record.agent_socket is None or record.ram_file is None:
        raise ValueError(f"{record.name} is not an agent VM")
    return AgentPort(
        record.name,
        Path(record.agent_socket),
        GuestRam(Path(record.ram_file), record.memory_bytes),
        record.memory_bytes,
        clock=clock,
        control=control,
        vcpus=vcpus,
    )


async def _closes_ended(vms: Iterable[ManagedVm]) -> None:
    for vm in vms:
        await vm.closed()


def _close_later(loop: asyncio.AbstractEventLoop, port: VmPort) -> asyncio.Task[None] | None:
    """Close the port now if the loop is idle; else start closing it and return the
    task, which must end before the port connects again (see ``QemuHypervisor._sample``)."""
    if loop.is_running():
        return loop.create_task(port.close())
    loop.run_until_complete(port.close())
    return None


def _warn_over_reserved(host: HostMemory, was: bool) -> bool:
    """Say so once when the guests' reservations come to exceed what they may share;
    returns whether they do now."""
    if host.over_reserved and not was:
        log.warning(
            "the guests' minimums and held sizes (%s) exceed the %s they may share; "
            "holding every guest at its minimum",
            format_size(host.reserved_bytes),
            format_size(host.shareable_bytes),
        )
    return host.over_reserved


class QemuHypervisor:
    """The scheduler's ``Hypervisor`` over the recorded VMs, on an event loop of its own
    that runs only while one of its methods does."""

    def __init__(
        self,
        records: Sequence[VMRecord],
        *,
        budget_bytes: int,
        meminfo: Callable[[], HostMemInfo],
        clock: Callable[[], float],
        connector: Callable[[VMRecord], VmPort] | None = None,
        bounds_for: Callable[[VMRecord], Bounds] | None = None,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
        on_target: Callable[[str, int], None] | None = None,
        period_s: float = 1.0,
        processors: Sequence[int] | None = None,
        vcpu_host: VcpuHost | None = None,
        memory_host: VmMemoryHost | None = None,
        cgroups: CgroupHost | None = None,
        host_paging: bool = True,
    ) -> None:
        """``period_s``: how often ``apply`` runs (the pacing rate is per second).
        ``processors``: host processors the agent VMs' vCPUs share; None leaves them
        alone. The host's side, real unless given: ``vcpu_host``, of the vCPU threads;
        ``memory_host``, what each VM holds; ``cgroups``, the VMs' memory cgroups
        (``host_paging`` False never caps one)."""
        self.budget_bytes = budget_bytes
        self._period_s = period_s
        self._cpus = (
            None
            if processors is None
            else ProcessorSharing(processors, vcpu_host or ProcVcpuHost(), clock)
        )
        self._meminfo = meminfo
        self._memory_host = memory_host or ProcVmMemory()
        self._clock = clock
        self._connector = connector or (lambda record: vm_port(record, clock))
        self._bounds_for = bounds_for or (lambda r: Bounds(r.min_bytes, r.max_bytes))
        self._stall_timeout_s = stall_timeout_s
        self._on_target = on_target
        self._reclaim = HostReclaim(cgroups or SysCgroups(), enabled=host_paging)
        self._vms: dict[str, ManagedVm] = {}
        self._over_reserved = False
        self.last_reading: HostReading | None = None  # the host as the last period read it
        self._retired = VmFailures()  # failures of VMs no longer managed
        self._loop = asyncio.new_event_loop()
        self.update_records(records)

    # -- lifecycle --------------------------------------------------------------------

    def update_records(self, records: Sequence[VMRecord]) -> None:
        """Start managing new VMs and forget removed ones (the state dir changed)."""
        names = {r.name for r in records}
        for gone in set(self._vms) - names:
            self._forget(gone, "no longer recorded")
        for record in records:
            vm = self._vms.get(record.name)
            if vm is None:
                self._vms[record.name] = ManagedVm(record)
                log.info("%s: managing (%s)", record.name, format_size(record.memory_bytes))
            elif vm.record != record:
                vm.record = record
                if vm.pacer is not None:
                    vm.pacer.bounds = self._bounds_for(record)

    def serve(self, seconds: float, stop: Callable[[], bool] = lambda: False) -> None:
        """Let the ports work for ``seconds`` between periods (or until ``stop()``).

        The event loop runs only while the adapter does: agents' messages are read,
        and their reports punched, as they arrive, not once a period.
        """

        async def idle() -> None:
            deadline = self._loop.time() + seconds
            while not stop() and (left := deadline - self._loop.time()) > 0:
                await asyncio.sleep(min(left, IDLE_SLICE_S))

        self._loop.run_until_complete(idle())

    def close(self) -> None:
        # Closes under way finish first, or the loop would drop them half done.
        self._loop.run_until_complete(_closes_ended(self._vms.values()))
        self._loop.run_until_complete(self._reclaim.release_all())
        for vm in self._vms.values():
            self._release(vm)
        self._loop.close()

    def _forget(self, name: str, why: str) -> None:
        vm = self._vms.pop(name)
        self._retired += vm.failures()
        log.warning("%s: %s; no longer managed", name, why)
        self._release(vm)

    def _release(self, vm: ManagedVm) -> None:
        if vm.port is not None:
            if vm.connected:
                _close_later(self._loop, vm.port)
            vm.port.release()
        vm.move_to(VmLife.GONE)

    # -- inspection -----------------------------------------------------------------------

    def managed(self) -> list[str]:
        return sorted(self._vms)

    def records(self) -> list[VMRecord]:
        """The managed VMs' records, as the policy is configured with them."""
        return [vm.record for vm in self._vms.values()]

    def view(self, name: str) -> VmView | None:
        """The VM as the adapter sees it now, or None if it is not managed."""
        vm = self._vms.get(name)
        return vm.view() if vm is not None else None

    def guest_counters(self) -> dict[str, Counts]:
        """Failure counters per managed VM, cumulative (see ``daemon/counters.py``)."""
        return {name: vm.failures().as_counters() for name, vm in self._vms.items()}

    def counters(self) -> Counts:
        """Failure counters of every VM ever managed, summed."""
        counts = sum((vm.failures() for vm in self._vms.values()), self._retired).as_counters()
        return {**counts, FailureCounter.HOST_PAGING_ERRORS: self._reclaim.errors}

    # -- the Hypervisor port ----------------------------------------------------------

    def specs(self) -> list[GuestSpec]:
        return [
            self._reclaim.spec_for(vm, self.configured_spec(vm.record)) for vm in self._vms.values()
        ]

    def configured_spec(self, r: VMRecord) -> GuestSpec:
        """The VM's spec as recorded (not as held when uncooperative)."""
        cpu = self._cpus.spec(r) if self._cpus is not None else None
        return GuestSpec(r.name, r.memory_bytes, r.min_bytes, r.max_bytes, r.shares, cpu=cpu)

    def read_host(self) -> HostReading:
        info = self._meminfo()
        vms = list(self._vms.values())
        held = sum(vm.held_bytes for vm in vms)
        # Guests the policy may not move (uncooperative ones are held where they are)
        # may reserve more than the VMs can share: see HostMemory.over_reserved.
        specs = zip(self.specs(), vms, strict=True)
        reserved = sum(spec.min_bytes for spec, vm in specs if vm.pacer is not None)
        host = host_memory(self.budget_bytes, info, held, reserved)
        self._over_reserved = _warn_over_reserved(host, self._over_reserved)
        cpus = None if self._cpus is None else len(self._cpus.processors)
        truth = host_truth(self.budget_bytes, info, sum(vm.truly_held_bytes for vm in vms))
        self.last_reading = host.reading(self._clock(), info, cpus, truth)
        return self.last_reading

    def sample_guests(self) -> list[GuestSample]:
        return self._loop.run_until_complete(self._sample_all())

    def apply(self, decision: Decision) -> None:
        self._loop.run_until_complete(self._apply(decision))

    # -- I/O ----------------------------------------------------------------------------

    async def _sample_all(self) -> list[GuestSample]:
        vms = [vm for vm in self._vms.values() if vm.life is not VmLife.BROKEN]
        for vm in vms:
            if vm.sampled:
                vm.move_to(VmLife.CONNECTED)  # a new period: last period's figures are old
        results = await asyncio.gather(*(self._sample(vm) for vm in vms), return_exceptions=True)
        samples = []
        for vm, result in zip(vms, results, strict=True):
            if isinstance(result, GuestSample):
                samples.append(result)
            elif isinstance(result, BaseException):
                self._failed(vm, result)
        # A VM known from earlier periods that could not be asked now (cut off,
        # reconnecting, no balloon device) still holds its memory: the policy sees it
        # as it was last, uncooperative, and holds it there (see specs()).
        for vm in self._vms.values():
            if not vm.sampled and vm.pacer is not None:
                samples.append(vm.stale_sample())
        return samples

    async def _sample(self, vm: ManagedVm) -> GuestSample:
        if vm.port is None:
            vm.port = self._connector(vm.record)
        if not vm.connected:
            await vm.closed()  # a close still under way would close the new connection
            await vm.port.connect()
            await vm.port.enable_stats(STATS_INTERVAL_S)
            vm.move_to(VmLife.CONNECTED)
            log.info("%s: connected", vm.record.name)
        actual = await vm.port.actual_bytes()
        stats = await vm.port.guest_stats()
        vm.observe(actual, stats, self._bounds_for(vm.record), self._stall_timeout_s)
        cpu = await self._cpus.sample(vm) if self._cpus is not None else None
        vm.move_to(VmLife.SAMPLED)
        host, cappable = self._reclaim.paging_of(vm, vm.host_held(self._memory_host))
        return vm.fresh_sample(self._period_s, cpu, host, host_cappable=cappable)

    def _failed(self, vm: ManagedVm, exc: BaseException) -> None:
        name = vm.record.name
        if not isinstance(exc, BackendError):
            raise exc  # a bug, not a guest failure
        if isinstance(exc, FatalBackendError):
            vm.fatal_errors += 1
            self._disconnect(vm, VmLife.BROKEN)
            log.error("%s: %s; left alone", name, exc)
            return
        vm.transient_errors += 1
        if vm.record.started_by_us and not vm.record.running():
            self._forget(name, "QEMU exited")
            return
        self._disconnect(vm, VmLife.RECONNECTING)
        log.warning("%s: %s; will reconnect", name, exc)

    def _disconnect(self, vm: ManagedVm, to: VmLife) -> None:
        """Close its port (a half-open one too: closing is idempotent) and move on."""
        if vm.port is not None:
            vm.closing = _close_later(self._loop, vm.port)
        vm.move_to(to)

    async def _apply(self, decision: Decision) -> None:
        wanted = decision.by_name()
        now = self._clock()
        sends = []
        for name, vm in self._vms.items():
            target = wanted.get(name)
            if target is None or not vm.sampled:
                continue
            # The balloon register, exactly as the simulated driver reads it: it carries
            # the policy's per-state rules (no reclamation while the host is HIGH).
            wanted_bytes = (
                vm.record.memory_bytes - target.balloon_bytes
                if decision.mechanisms.balloon
                else vm.actual_bytes
            )
            next_bytes = vm.next_target_bytes(wanted_bytes, now)
            if next_bytes is not None:
                sends.append((vm, next_bytes))
        results = await asyncio.gather(
            *(vm.port.set_target(b) for vm, b in sends if vm.port is not None),
            return_exceptions=True,
        )
        for (vm, sent), result in zip(sends, results, strict=True):
            if isinstance(result, BaseException):
                self._failed(vm, result)
                continue
            vm.sent(sent)
            if self._on_target is not None:
                self._on_target(vm.record.name, sent)
        if self._cpus is not None:
            await self._cpus.apply(self._vms, wanted, self._failed)
        await self._reclaim.apply(self._vms.values(), decision, self.last_reading)


__all__ = ["QemuHypervisor", "agent_port", "vm_port"]
