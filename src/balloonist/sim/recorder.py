"""A simulated run's time series, filled in period by period from the machine's state."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from balloonist.model import GuestTarget, GuestView, HostState
from balloonist.scheduler import Cycle
from balloonist.sim import engine as e
from balloonist.sim.machine import SimMachine
from balloonist.sim.result import (
    HOST_STATE_CODES,
    CpuSeries,
    GuestProgress,
    GuestSeries,
    Progress,
    SimResult,
)
from balloonist.sim.scenario import Scenario
from balloonist.units import PAGE_SIZE_BYTES

__all__ = ["Recorder"]

_COUNTERS = {
    "refs": e.S_REFS,
    "major_faults": e.S_MAJOR,
    "guest_swap_outs": e.S_GUEST_SWAP_OUT,
    "host_swap_ins": e.S_HOST_SWAP_IN,
    "host_swap_outs": e.S_HOST_SWAP_OUT,
    "double_paging": e.S_DOUBLE_PAGING,
}


class Recorder:
    """The run's time series, filled in period by period from the machine's state."""

    def __init__(self, scenario: Scenario, machine: SimMachine) -> None:
        self._scenario = scenario
        self._machine = machine
        periods, n = scenario.periods, len(machine.guests)
        self._series = {key: np.zeros((n, periods), dtype=np.int64) for key in _SERIES_KEYS}
        self._reported = np.zeros((n, periods), dtype=np.int64)  # running totals
        self._host_free = np.zeros(periods, dtype=np.int64)
        self._host_swap = np.zeros(periods, dtype=np.int64)
        self._host_state = np.zeros(periods, dtype=np.int64)
        self._times = np.zeros(periods, dtype=np.float64)
        self._last = self._counters()
        n_cpu = 0 if machine.cpus is None else len(machine.cpus.names)
        self._cpu_ints = {k: np.zeros((n_cpu, periods), dtype=np.int64) for k in _CPU_INT_KEYS}
        self._cpu_floats = {
            k: np.zeros((n_cpu, periods), dtype=np.float64) for k in _CPU_FLOAT_KEYS
        }

    def _counters(self) -> npt.NDArray[np.int64]:
        return np.array([[m.st[idx] for idx in _COUNTERS.values()] for m in self._machine.guests])

    def period(self, k: int, cycle: Cycle, host_state: HostState) -> None:
        """Record period ``k``, just run, as ``cycle`` decided it."""
        machine = self._machine
        targets = cycle.decision.by_name()
        views = {v.name: v for v in cycle.snapshot.guests}
        now = self._counters()
        delta, self._last = now - self._last, now
        series = self._series
        for i, m in enumerate(machine.guests):
            t = targets.get(m.spec.name)
            series["allocation_bytes"][i, k] = m.mapped_pages * PAGE_SIZE_BYTES
            series["target_bytes"][i, k] = t.allocation_bytes if t else 0
            series["balloon_bytes"][i, k] = int(m.st[e.S_BALLOON]) * PAGE_SIZE_BYTES
            series["balloon_target_bytes"][i, k] = m.register_pages * PAGE_SIZE_BYTES
            view = views.get(m.spec.name)
            series["working_set_bytes"][i, k] = view.working_set_bytes if view else 0
            driver = machine.drivers[i]
            series["balloon_rate_pages"][i, k] = driver.rate.step_units if driver else 0
            for j, key in enumerate(_COUNTERS):
                series[key][i, k] = delta[i, j]
            self._reported[i, k] = m.reported_pages * PAGE_SIZE_BYTES
        self._cpu_period(k, targets, views)
        self._times[k] = machine.time_s
        self._host_free[k] = machine.free_pages() * PAGE_SIZE_BYTES
        self._host_swap[k] = (
            machine.host_swap_pages - int(machine.host[e.H_SWAP_FREE])
        ) * PAGE_SIZE_BYTES
        self._host_state[k] = HOST_STATE_CODES.index(host_state)

    def _cpu_period(
        self, k: int, targets: Mapping[str, GuestTarget], views: Mapping[str, GuestView]
    ) -> None:
        cpus = self._machine.cpus
        if cpus is None or cpus.last is None:
            return
        ran = cpus.last
        ints, floats = self._cpu_ints, self._cpu_floats
        for j, name in enumerate(cpus.names):
            t = targets.get(name)
            view = views.get(name)
            ints["online_vcpus"][j, k] = cpus.host.online(j)
            ints["allocation_target_cpus"][j, k] = (
                t.cpu.allocation_cpus if t is not None and t.cpu is not None else 0
            )
            ints["balloon_target_vcpus"][j, k] = cpus.registers[j]
            demand = view.cpu_demand_vcpus if view is not None else None
            floats["demand_vcpus"][j, k] = demand if demand is not None else 0.0
            floats["useful_cpu_s"][j, k] = ran.useful_cpu_s[j]
            floats["ran_cpu_s"][j, k] = ran.ran_cpu_s[j]
            floats["spin_cpu_s"][j, k] = ran.spin_cpu_s[j]
            floats["switch_lost_cpu_s"][j, k] = ran.switch_lost_cpu_s[j]

    def progress(self, k: int, host_state: HostState) -> Progress:
        """Where the run is after period ``k``, for a live view."""
        machine, series = self._machine, self._series
        return Progress(
            period=k + 1,
            periods=self._scenario.periods,
            time_s=machine.time_s,
            host_memory_bytes=machine.host_pages * PAGE_SIZE_BYTES,
            host_free_bytes=int(self._host_free[k]),
            host_state=host_state,
            guests=tuple(
                GuestProgress(
                    name=m.spec.name,
                    memory_bytes=m.spec.memory_bytes,
                    allocation_bytes=int(series["allocation_bytes"][i, k]),
                    target_bytes=int(series["target_bytes"][i, k]),
                    balloon_bytes=int(series["balloon_bytes"][i, k]),
                    working_set_bytes=int(series["working_set_bytes"][i, k]),
                    refs_per_s=float(series["refs"][i, k]) / self._scenario.period_s,
                    major_faults=int(m.st[e.S_MAJOR]),
                )
                for i, m in enumerate(machine.guests)
            ),
        )

    def result(self, policy: str) -> SimResult:
        machine, scenario = self._machine, self._scenario
        guests = tuple(
            GuestSeries(
                name=m.spec.name,
                memory_bytes=m.spec.memory_bytes,
                **{key: self._series[key][i].copy() for key in _SERIES_KEYS},
                reported_bytes=None if m.reporting_delay_s is None else self._reported[i].copy(),
            )
            for i, m in enumerate(machine.guests)
        )
        cpu_series: tuple[CpuSeries, ...] = ()
        if machine.cpus is not None:
            cpus = machine.cpus
            cpu_series = tuple(
                CpuSeries(
                    name=name,
                    vcpus=cpus.host.guests[j].vcpus,
                    **{key: self._cpu_ints[key][j].copy() for key in _CPU_INT_KEYS},
                    **{key: self._cpu_floats[key][j].copy() for key in _CPU_FLOAT_KEYS},
                )
                for j, name in enumerate(cpus.names)
            )
        return SimResult(
            scenario=scenario.name,
            policy=policy,
            seed=scenario.seed,
            duration_s=scenario.periods * scenario.period_s,
            period_s=scenario.period_s,
            host_memory_bytes=machine.host_pages * PAGE_SIZE_BYTES,
            time_s=self._times,
            host_free_bytes=self._host_free,
            host_swap_used_bytes=self._host_swap,
            host_state=self._host_state,
            guests=guests,
            host_cpus=scenario.host_cpus,
            cpus=cpu_series,
        )


#: CpuSeries' per-period series, whole numbers and not.
_CPU_INT_KEYS = ("online_vcpus", "allocation_target_cpus", "balloon_target_vcpus")
_CPU_FLOAT_KEYS = ("demand_vcpus", "useful_cpu_s", "ran_cpu_s", "spin_cpu_s", "switch_lost_cpu_s")

#: Every per-period series every guest has, in GuestSeries' order.
_SERIES_KEYS = tuple(
    f.name
    for f in dataclasses.fields(GuestSeries)
    if f.name not in ("name", "memory_bytes", "reported_bytes")
)
