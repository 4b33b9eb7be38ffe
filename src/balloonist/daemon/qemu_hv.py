"""The scheduler's ``Hypervisor`` port over real QEMU guests.

One period, for every recorded VM: connect if needed, read the balloon's actual size
and the guest's statistics, and hand the scheduler a sample; then send each guest the
next paced, safety-checked target (:mod:`balloonist.daemon.pacing`).

**Demand from guest statistics.** A real guest gives no page-access samples, so its
working-set observation is built from what virtio-balloon reports:

    used      = min(total, actual) - available
    pressure  = (major faults + swap-ins since the last period) x page size
    shortfall = available floor - available, if positive
    observed  = used + pressure + shortfall, within [0, memory]

``min(total, actual)``: with ``deflate-on-oom`` Linux keeps ballooned pages in its
total and takes them out of "available", without it the total shrinks; either way the
minimum is what the guest has to work with. Pages the guest had to read back in were
needed and not resident, so they count as demand beyond what it uses now. A guest
below its available floor is about to reclaim hard, or, without swap, to OOM-kill:
what it lacks of the floor is demand too. Without these two terms a guest could never
look bigger than what it already holds.

**Host memory** for the policy is the budget, or less when the host is short for
reasons of its own: never more than what the guests hold (their balloons' actual
sizes) plus the host's ``MemAvailable``. Free memory is that minus what they hold.
A VM that could not be sampled this period still holds its last known size. When the
guests' minimums and the sizes uncooperative guests are held at add up to more than
that, the memory is in use regardless: the policy is given that much, so it holds
everyone at their minimum instead of refusing to decide (logged once).

**Processors.** With ``processors`` given (``[daemon] processors``), agent VMs with
recorded vCPUs share them through their CPU balloons; see
:mod:`balloonist.daemon.processors` for the grants, the demand and the order of moves.

**Failures.** A VM whose QEMU has exited is dropped with one log line; one whose
socket does not answer is retried every period (reconnecting) and left out of the
cycle meanwhile; one without a balloon device is logged once and left alone. None of
these stops the others from being managed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

from balloonist.agent.cpus import format_cpu_list
from balloonist.daemon.agent_link import AgentPort, CpuReport
from balloonist.daemon.backend import AGENT_REJECTED, FATAL_ERRORS, STALLS, TRANSIENT_ERRORS
from balloonist.daemon.pacing import DEFAULT_STALL_TIMEOUT_S, Bounds, GuestPacer
from balloonist.daemon.processors import VmProcessors, grants, threads_cpu_s
from balloonist.errors import BackendError, ConfigError, FatalBackendError
from balloonist.host import HostMemInfo
from balloonist.model import (
    CpuSample,
    CpuSpec,
    Decision,
    GuestSample,
    GuestSpec,
    GuestTarget,
    HostReading,
)
from balloonist.qemu.affinity import narrow_vcpu_affinity
from balloonist.qemu.launcher import VMRecord
from balloonist.qemu.qmp import BalloonQMP, GuestStats
from balloonist.qemu.reclaim import GuestRam
from balloonist.units import PAGE_SIZE_BYTES, format_size

log = logging.getLogger("balloonist.daemon")

#: Guest statistics polling interval asked of each guest's driver, seconds.
STATS_INTERVAL_S = 1
#: How often ``serve`` checks whether to stop, seconds.
IDLE_SLICE_S = 0.1
#: Targets remembered per VM (for inspection and tests); older ones are dropped.
SENT_HISTORY = 10_000


class VmPort(Protocol):
    """What the adapter needs of one VM: ``BalloonQMP`` for virtio-balloon VMs,
    ``AgentPort`` for VMs run through our agent.

    A port lives as long as the VM is managed: ``connect`` and ``close`` may alternate
    (reconnects), and ``release`` ends it.
    """

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    def release(self) -> None: ...

    @property
    def cooperative(self) -> bool: ...

    async def set_target(self, guest_bytes: int) -> None: ...

    async def actual_bytes(self) -> int: ...

    async def enable_stats(self, interval_s: int) -> None: ...

    async def guest_stats(self) -> GuestStats: ...


@runtime_checkable
class CpuBalloonPort(Protocol):
    """What the adapter needs of a VM whose CPU balloon it drives (``AgentPort``)."""

    @property
    def cpu_report(self) -> CpuReport | None: ...

    async def set_cpu_target(self, reserved_vcpus: int) -> None: ...

    async def vcpu_threads(self) -> dict[int, int]: ...


def vm_port(record: VMRecord, clock: Callable[[], float]) -> VmPort:
    """The real port for a VM: through its agent if it has one, else virtio-balloon."""
    qmp = BalloonQMP(Path(record.qmp_socket), name=record.name)
    if record.agent_socket is None or record.ram_file is None:
        return qmp
    return AgentPort(
        record.name,
        Path(record.agent_socket),
        GuestRam(Path(record.ram_file), record.memory_bytes),
        record.memory_bytes,
        clock=clock,
        control=qmp,
    )


@dataclass
class _Vm:
    record: VMRecord
    port: VmPort | None = None
    connected: bool = False
    pacer: GuestPacer | None = None
    actual_bytes: int = 0
    stats: GuestStats | None = None
    faults: int | None = None  # major faults + swap-ins at the last sample
    observed_bytes: int | None = None
    sampled: bool = False
    broken: bool = False  # no balloon device: left alone
    cpu: VmProcessors | None = None  # its processors, when the daemon shares them
    sent: deque[int] = field(default_factory=lambda: deque(maxlen=SENT_HISTORY))
    counters: Counter[str] = field(default_factory=Counter)  # failures, cumulative

    def agent_rejected(self) -> int:
        """Messages its agent sent that were refused (0 for a virtio-balloon VM)."""
        if isinstance(self.port, AgentPort):
            return sum(self.port.session.violations.values())
        return 0


def demand_bytes(
    actual_bytes: int,
    memory_bytes: int,
    stats: GuestStats | None,
    new_faults: int,
    floor_bytes: int = 0,
) -> int | None:
    """The working-set observation from guest statistics (see the module docstring)."""
    if stats is None or stats.total_bytes is None or stats.available_bytes is None:
        return None
    used = max(0, min(stats.total_bytes, actual_bytes) - stats.available_bytes)
    pressure = max(0, new_faults) * PAGE_SIZE_BYTES
    shortfall = max(0, floor_bytes - stats.available_bytes)
    return min(memory_bytes, used + pressure + shortfall)


class QemuHypervisor:
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
    ) -> None:
        """``period_s``: how often ``apply`` runs, so the pacing rate (pages per step)
        can be reported per second. ``processors``: host processors the agent VMs'
        vCPUs share; None leaves processors alone."""
        self.budget_bytes = budget_bytes
        self._period_s = period_s
        self._processors = tuple(processors) if processors is not None else None
        self._meminfo = meminfo
        self._clock = clock
        self._connector = connector or (lambda record: vm_port(record, clock))
        self._bounds_for = bounds_for or (lambda r: Bounds(r.min_bytes, r.max_bytes))
        self._stall_timeout_s = stall_timeout_s
        self._on_target = on_target
        self._vms: dict[str, _Vm] = {}
        self._over_reserved = False
        self._retired: Counter[str] = Counter()  # counters of VMs no longer managed
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
                self._vms[record.name] = _Vm(record)
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
        for vm in self._vms.values():
            if vm.port is not None:
                if vm.connected:
                    self._loop.run_until_complete(vm.port.close())
                vm.port.release()
        self._loop.close()

    def managed(self) -> list[str]:
        return sorted(self._vms)

    def actual_bytes(self, name: str) -> int | None:
        """The guest's size at its last sample, or None if it is not managed."""
        vm = self._vms.get(name)
        return vm.actual_bytes if vm is not None and vm.sampled else None

    def sent_targets(self, name: str) -> list[int]:
        return list(self._vms[name].sent)

    def vcpu_threads(self, name: str) -> dict[int, int] | None:
        """The VM's vCPU threads, once the daemon drives its processors (inspection)."""
        cpu = self._vms[name].cpu
        return None if cpu is None or cpu.threads is None else dict(cpu.threads)

    def records(self) -> list[VMRecord]:
        """The managed VMs' records, as the policy is configured with them."""
        return [vm.record for vm in self._vms.values()]

    def guest_counters(self) -> dict[str, dict[str, int]]:
        """Failure counters per managed VM, cumulative (see ``daemon/backend.py``)."""
        return {name: self._counters_of(vm) for name, vm in self._vms.items()}

    def counters(self) -> dict[str, int]:
        """Failure counters of every VM ever managed, summed."""
        total = Counter(self._retired)
        for vm in self._vms.values():
            total.update(self._counters_of(vm))
        return {key: total[key] for key in (TRANSIENT_ERRORS, FATAL_ERRORS, STALLS, AGENT_REJECTED)}

    @staticmethod
    def _counters_of(vm: _Vm) -> dict[str, int]:
        return {
            TRANSIENT_ERRORS: vm.counters[TRANSIENT_ERRORS],
            FATAL_ERRORS: vm.counters[FATAL_ERRORS],
            STALLS: vm.counters[STALLS],
            AGENT_REJECTED: vm.agent_rejected(),
        }

    def port(self, name: str) -> VmPort | None:
        """The VM's port, once it has been sampled (for inspection and tests)."""
        return self._vms[name].port

    def _forget(self, name: str, why: str) -> None:
        vm = self._vms.pop(name)
        self._retired.update(self._counters_of(vm))
        log.warning("%s: %s; no longer managed", name, why)
        if vm.port is not None:
            if vm.connected:
                self._close_later(vm.port)
            vm.port.release()

    def _close_later(self, port: VmPort) -> None:
        if self._loop.is_running():
            self._loop.create_task(port.close())
        else:
            self._loop.run_until_complete(port.close())

    # -- the Hypervisor port ----------------------------------------------------------

    def specs(self) -> list[GuestSpec]:
        specs = []
        for vm in self._vms.values():
            r = vm.record
            spec = self.configured_spec(r)
            if not self._cooperative(vm):
                # Do not count on memory it will not give: hold it where it is.
                held = max(r.min_bytes, min(vm.actual_bytes, r.max_bytes))
                spec = replace(spec, min_bytes=held, max_bytes=held)
            specs.append(spec)
        return specs

    def configured_spec(self, r: VMRecord) -> GuestSpec:
        """The VM's spec as recorded (not as held when uncooperative)."""
        return GuestSpec(
            r.name, r.memory_bytes, r.min_bytes, r.max_bytes, r.shares, cpu=self._cpu_spec(r)
        )

    def _cpu_spec(self, r: VMRecord) -> CpuSpec | None:
        """Its processors' spec, if the daemon shares them: an agent VM we started,
        with its vCPUs recorded."""
        if self._processors is None or not r.agent or r.cpus is None or r.pid is None:
            return None
        return CpuSpec(r.cpus, r.cpu_min, r.cpu_max, r.cpu_shares)

    @staticmethod
    def _cooperative(vm: _Vm) -> bool:
        if vm.pacer is None:
            return True  # never sampled: not in the policy's view yet
        reachable = vm.sampled and vm.port is not None and vm.port.cooperative
        return reachable and vm.pacer.cooperative

    def read_host(self) -> HostReading:
        info = self._meminfo()
        # Every managed VM holds memory, reachable this period or not: its last known
        # size, or all of it if it was never sampled. A VM that cannot be asked (cut
        # off, reconnecting, no balloon device) must not look like free memory.
        held = sum(
            vm.actual_bytes if vm.pacer is not None else vm.record.memory_bytes
            for vm in self._vms.values()
        )
        # The budget is what the VMs may hold; the host may still run short of it for
        # reasons of its own (other processes, pinned cache), and then the VMs share
        # only what they hold plus what the host has available.
        memory = min(self.budget_bytes, held + info.available_bytes)
        # Guests the policy may not move (uncooperative ones are held where they are)
        # can reserve more than that; then the memory is in use anyway, and the best
        # the policy can do is hold everyone at their minimum. Say so, rather than
        # refuse to decide and leave every guest unmanaged.
        reserved = sum(
            spec.min_bytes
            for spec, vm in zip(self.specs(), self._vms.values(), strict=True)
            if vm.pacer is not None
        )
        if reserved > memory and not self._over_reserved:
            log.warning(
                "the guests' minimums and held sizes (%s) exceed the %s they may share; "
                "holding every guest at its minimum",
                format_size(reserved),
                format_size(memory),
            )
        self._over_reserved = reserved > memory
        memory = max(memory, reserved)
        return HostReading(
            time_s=self._clock(),
            memory_bytes=memory,
            free_bytes=max(0, memory - held),
            swap_bytes=info.swap_total_bytes,
            swap_used_bytes=info.swap_total_bytes - info.swap_free_bytes,
            cpus=None if self._processors is None else len(self._processors),
        )

    def sample_guests(self) -> list[GuestSample]:
        return self._loop.run_until_complete(self._sample_all())

    def apply(self, decision: Decision) -> None:
        self._loop.run_until_complete(self._apply(decision))

    # -- I/O ----------------------------------------------------------------------------

    async def _sample_all(self) -> list[GuestSample]:
        vms = [vm for vm in self._vms.values() if not vm.broken]
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
                samples.append(self._stale_sample(vm))
        return samples

    @staticmethod
    def _stale_sample(vm: _Vm) -> GuestSample:
        r = vm.record
        return GuestSample(
            name=r.name,
            allocated_bytes=vm.actual_bytes,
            balloon_bytes=r.memory_bytes - vm.actual_bytes,
            balloon_target_bytes=r.memory_bytes - vm.actual_bytes,
            active_bytes_observed=None,
            cooperative=False,
        )

    async def _sample(self, vm: _Vm) -> GuestSample:
        vm.sampled = False
        if vm.port is None:
            vm.port = self._connector(vm.record)
        if not vm.connected:
            await vm.port.connect()
            await vm.port.enable_stats(STATS_INTERVAL_S)
            vm.connected = True
            log.info("%s: connected", vm.record.name)
        actual = await vm.port.actual_bytes()
        stats = await vm.port.guest_stats()
        r = vm.record
        faults_now = (stats.major_faults or 0) + (stats.swap_in_pages or 0)
        new_faults = 0 if vm.faults is None else faults_now - vm.faults
        vm.faults = faults_now
        vm.actual_bytes = actual
        vm.stats = stats
        bounds = self._bounds_for(r)
        vm.observed_bytes = demand_bytes(
            actual, r.memory_bytes, stats, new_faults, bounds.available_floor_bytes
        )
        if vm.pacer is None:
            vm.pacer = GuestPacer.starting_at(actual, bounds, self._stall_timeout_s)
        vm.sampled = True
        return GuestSample(
            name=r.name,
            allocated_bytes=actual,
            balloon_bytes=r.memory_bytes - actual,
            balloon_target_bytes=r.memory_bytes - vm.pacer.commanded_bytes,
            active_bytes_observed=vm.observed_bytes,
            free_bytes=stats.free_bytes,
            major_faults=stats.major_faults or 0,
            cooperative=self._cooperative(vm),
            inflate_rate_bytes_per_s=vm.pacer.rate.rate_pages * PAGE_SIZE_BYTES / self._period_s,
            cpu=await self._sample_cpus(vm),
        )

    async def _sample_cpus(self, vm: _Vm) -> CpuSample | None:
        r = vm.record
        spec = self._cpu_spec(r)
        if spec is None or r.pid is None or not isinstance(vm.port, CpuBalloonPort):
            return None
        cpu = vm.cpu
        if cpu is None:
            cpu = vm.cpu = VmProcessors(vcpus=spec.vcpus)
        if cpu.threads is None:
            cpu.threads = await vm.port.vcpu_threads()
        cpu.observe(threads_cpu_s(r.pid, cpu.threads), self._clock())
        report = vm.port.cpu_report
        reserved = len(report.reserved_vcpus) if report is not None else 0
        return CpuSample(
            online_vcpus=spec.vcpus - reserved,
            balloon_vcpus=reserved,
            balloon_target_vcpus=cpu.sent_reserved,
            demand_vcpus=cpu.demand_vcpus,
        )

    def _failed(self, vm: _Vm, exc: BaseException) -> None:
        name = vm.record.name
        if not isinstance(exc, BackendError):
            raise exc  # a bug, not a guest failure
        if isinstance(exc, FatalBackendError):
            vm.counters[FATAL_ERRORS] += 1
            vm.broken = True
            log.error("%s: %s; left alone", name, exc)
            return
        vm.counters[TRANSIENT_ERRORS] += 1
        if vm.record.started_by_us and not vm.record.running():
            self._forget(name, "QEMU exited")
            return
        # Transient: drop the connection and try again next period.
        if vm.port is not None and vm.connected:
            self._close_later(vm.port)
        vm.connected = False
        log.warning("%s: %s; will reconnect", name, exc)

    async def _apply(self, decision: Decision) -> None:
        wanted = decision.by_name()
        now = self._clock()
        sends = []
        for name, vm in self._vms.items():
            target = wanted.get(name)
            if target is None or not vm.sampled or vm.pacer is None or not vm.connected:
                continue
            available = vm.stats.available_bytes if vm.stats else None
            # The balloon register, exactly as the simulated driver reads it: it carries
            # the policy's per-state rules (no reclamation while the host is HIGH).
            wanted_bytes = (
                vm.record.memory_bytes - target.balloon_bytes
                if decision.mechanisms.balloon
                else vm.actual_bytes
            )
            was_cooperative = vm.pacer.cooperative
            next_bytes = vm.pacer.step(wanted_bytes, vm.actual_bytes, available, now)
            if was_cooperative and not vm.pacer.cooperative:
                vm.counters[STALLS] += 1
                log.warning("%s: balloon stalled; uncooperative", name)
            log.debug(
                "%s: actual %s, observed %s, policy %s, sending %s",
                name,
                format_size(vm.actual_bytes),
                format_size(vm.observed_bytes or 0),
                format_size(wanted_bytes),
                format_size(next_bytes),
            )
            if vm.sent and vm.sent[-1] == next_bytes:
                continue
            sends.append((vm, next_bytes))
        results = await asyncio.gather(
            *(vm.port.set_target(b) for vm, b in sends if vm.port is not None),
            return_exceptions=True,
        )
        for (vm, sent), result in zip(sends, results, strict=True):
            if isinstance(result, BaseException):
                self._failed(vm, result)
                continue
            vm.sent.append(sent)
            if self._on_target is not None:
                self._on_target(vm.record.name, sent)
        if self._processors is not None:
            await self._apply_cpus(wanted, self._processors)

    async def _apply_cpus(
        self, wanted: dict[str, GuestTarget], processors: tuple[int, ...]
    ) -> None:
        """The CPU balloon targets and the affinity grants, in the order of
        :mod:`balloonist.daemon.processors`."""
        moving = {
            name: (vm, target.cpu)
            for name, vm in self._vms.items()
            if (target := wanted.get(name)) is not None
            and target.cpu is not None
            and vm.cpu is not None
            and vm.connected
        }
        granted = grants({n: cpu.allocation_cpus for n, (_, cpu) in moving.items()}, processors)
        every = frozenset(processors)
        for name, (vm, cpu_target) in moving.items():
            port, cpu = vm.port, vm.cpu
            assert isinstance(port, CpuBalloonPort) and cpu is not None  # by _sample_cpus
            report = port.cpu_report
            online_now = cpu.vcpus - (len(report.reserved_vcpus) if report is not None else 0)
            desired = cpu_target.balloon_vcpus
            try:
                if desired < cpu.sent_reserved:
                    # Giving processors back: room first, then the vCPUs.
                    self._set_affinity(
                        vm, cpu.affinity_for(granted[name], cpu.vcpus - desired, every)
                    )
                    await port.set_cpu_target(desired)
                else:
                    if desired != cpu.sent_reserved:
                        await port.set_cpu_target(desired)
                    self._set_affinity(vm, cpu.affinity_for(granted[name], online_now, every))
                cpu.sent_reserved = desired
            except BackendError as exc:
                self._failed(vm, exc)
            except ConfigError as exc:  # the policy keeps one vCPU: a bug if it asks for all
                log.error("%s: CPU balloon target not sent: %s", name, exc)

    def _set_affinity(self, vm: _Vm, mask: frozenset[int]) -> None:
        cpu, pid = vm.cpu, vm.record.pid
        assert cpu is not None and cpu.threads is not None and pid is not None
        if mask == cpu.affinity:
            return
        narrow_vcpu_affinity(pid, cpu.threads, mask)
        cpu.affinity = mask
        log.info("%s: vCPU threads on host processors %s", vm.record.name, format_cpu_list(mask))


__all__ = ["CpuBalloonPort", "QemuHypervisor", "VmPort", "demand_bytes", "vm_port"]
