"""The simulated host's processors: the :class:`~balloonist.sim.cpu.CpuHost` model, with
a CPU balloon in every guest that has one, for :class:`~balloonist.sim.machine.SimMachine`.

Each guest's CPU balloon is the shared :class:`~balloonist.driver.BalloonDriver`, the
same loop that inflates memory balloons, bound to the guest's CPU hotplug: its unit
is one vCPU, and a unit range is a range of vCPU numbers. It reads the CPU
balloon register, takes vCPUs offline (the highest-numbered first) or brings them
back, and is paced by the shared adaptive rate controller in vCPUs per period. Taking
a vCPU offline fails only for the guest's last one, which it never gives up.

The host needs no report of which vCPUs went offline: every quantum it maps the
online vCPUs that have work onto its processors (sim/cpu.py, rule 2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

from balloonist.driver import BalloonDriver, UnitRange, count_units
from balloonist.model import CpuSample, GuestSpec, GuestTarget
from balloonist.rate import AdaptiveRate, RateLimits
from balloonist.sim.cpu import CpuGuest, CpuHost, CpuPeriod
from balloonist.sim.scenario import Scenario

#: A CPU balloon starts by taking one vCPU a period and adds one per period that got
#: all it asked for: processors move in whole units, and a guest's scheduler needs a
#: moment to move its tasks off each one.
CPU_RATE_START_VCPUS: Final = 1
CPU_RATE_INCREASE_VCPUS: Final = 1


class _CpuHotplug:
    """One guest's CPU hotplug as the driver's GuestKernel port (its unit is a vCPU)."""

    def __init__(self, host: CpuHost, index: int) -> None:
        self._host = host
        self._index = index

    def allocate_units(self, count: int) -> list[UnitRange]:
        online = self._host.online(self._index)
        take = min(count, online - 1)  # never the last vCPU
        if take <= 0:
            return []
        self._host.set_online(self._index, online - take)
        return [UnitRange(online - take, take)]  # the highest-numbered online vCPUs

    def free_units(self, ranges: Sequence[UnitRange]) -> None:
        online = self._host.online(self._index)
        self._host.set_online(self._index, online + count_units(ranges))


class _CpuRegister:
    """One guest's CPU balloon register, as the driver's BalloonChannel port."""

    def __init__(self, registers: list[int], index: int) -> None:
        self._registers = registers
        self._index = index

    def read_target_units(self) -> int:
        return self._registers[self._index]

    def report_locked(self, ranges: Sequence[UnitRange]) -> None:
        pass  # the host schedules whatever is online; nothing to unmap

    def report_unlocked(self, ranges: Sequence[UnitRange]) -> None:
        pass


class SimCpus:
    """The processors of ``scenario``'s host and of its guests that have ``cpus``."""

    def __init__(self, scenario: Scenario) -> None:
        assert scenario.host_cpus is not None  # the caller checks: no host, no SimCpus
        sharing = [g for g in scenario.guests if g.spec.cpu is not None]
        self.names: Final = tuple(g.name for g in sharing)
        self._index = {name: j for j, name in enumerate(self.names)}
        guests = []
        for g in sharing:
            assert g.spec.cpu is not None and g.cpu_workload is not None  # by the scenario
            guests.append(CpuGuest(g.name, g.spec.cpu.vcpus, g.spec.cpu.shares, g.cpu_workload))
        self.host: Final = CpuHost(scenario.host_cpus, guests, scenario.cpu_costs, scenario.seed)
        self.registers = [0] * len(guests)
        self.drivers: list[BalloonDriver | None] = []
        for j, g in enumerate(sharing):
            assert g.spec.cpu is not None
            limits = RateLimits(
                min_units=CPU_RATE_START_VCPUS,
                max_units=g.spec.cpu.vcpus,
                increase_units=CPU_RATE_INCREASE_VCPUS,
            )
            self.drivers.append(
                BalloonDriver(
                    _CpuHotplug(self.host, j),
                    _CpuRegister(self.registers, j),
                    AdaptiveRate(limits),
                )
                if g.spec.cpu.balloon
                else None
            )
        self.last: CpuPeriod | None = None

    def sample(self, name: str) -> CpuSample | None:
        j = self._index.get(name)
        if j is None:
            return None
        vcpus = self.host.guests[j].vcpus
        online = self.host.online(j)
        return CpuSample(
            online_vcpus=online,
            balloon_vcpus=vcpus - online,
            balloon_target_vcpus=self.registers[j],
            demand_vcpus=None if self.last is None else self.last.demand_vcpus[j],
        )

    def apply(self, targets: Mapping[str, GuestTarget]) -> None:
        """Write the CPU balloon registers; a guest without a CPU target keeps its own."""
        for j, name in enumerate(self.names):
            target = targets.get(name)
            if target is None or target.cpu is None or self.drivers[j] is None:
                continue
            vcpus = self.host.guests[j].vcpus
            self.registers[j] = max(0, min(vcpus - 1, target.cpu.balloon_vcpus))

    def set_spec(self, spec: GuestSpec) -> None:
        """A live change of a guest's CPU shares (min and max are the policy's)."""
        j = self._index.get(spec.name)
        if j is not None and spec.cpu is not None:
            self.host.set_shares(j, spec.cpu.shares)

    def advance(self, start_s: float, period_s: float) -> CpuPeriod:
        """The CPU balloons step once, then the host runs the period."""
        for driver in self.drivers:
            if driver is not None:
                driver.step()
        self.last = self.host.run(start_s, period_s)
        return self.last


__all__ = ["SimCpus"]
