"""What a simulation run produces: per-period time series and the summary figures.

Series are numpy arrays, one entry per scheduler period, sampled at the end of the
period. Counters (references, faults, swaps) are per period, not cumulative; the
memory free page reporting returned is a running total.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from balloonist.model import HostState

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Order of host states in ``SimResult.host_state`` codes.
HOST_STATE_CODES: tuple[HostState, ...] = (
    HostState.HIGH,
    HostState.SOFT,
    HostState.HARD,
    HostState.LOW,
)


@dataclass(frozen=True)
class GuestSeries:
    name: str
    memory_bytes: int  # configured memory
    allocation_bytes: IntArray  # machine memory backing the guest
    target_bytes: IntArray  # allocation target the policy set
    balloon_bytes: IntArray  # actual balloon size
    balloon_target_bytes: IntArray  # the balloon register
    working_set_bytes: IntArray  # the scheduler's estimate
    refs: IntArray  # page references completed in the period
    major_faults: IntArray  # guest page faults served from guest swap
    guest_swap_outs: IntArray
    host_swap_ins: IntArray
    host_swap_outs: IntArray
    double_paging: IntArray  # guest evicted a page the host had already swapped out
    balloon_rate_pages: IntArray  # the driver's adaptive rate at the end of the period
    #: Machine memory free page reporting returned to the host, a running total at the
    #: end of each period; None for a guest without reporting.
    reported_bytes: IntArray | None = None


@dataclass(frozen=True)
class CpuSeries:
    """One guest's processors, per period (for guests whose processors are shared)."""

    name: str
    vcpus: int
    online_vcpus: IntArray  # at the end of the period
    allocation_target_cpus: IntArray  # processors the policy wanted it to have
    balloon_target_vcpus: IntArray  # the CPU balloon register
    demand_vcpus: FloatArray  # the scheduler's estimate
    useful_cpu_s: FloatArray  # processor time spent on its tasks' own work
    ran_cpu_s: FloatArray  # processor time its vCPUs got
    spin_cpu_s: FloatArray  # of that, spent spinning at barriers
    switch_lost_cpu_s: FloatArray  # of that, lost refilling caches


@dataclass(frozen=True)
class SimResult:
    scenario: str
    policy: str
    seed: int
    duration_s: float
    period_s: float
    host_memory_bytes: int
    time_s: FloatArray  # end of each period
    host_free_bytes: IntArray
    host_swap_used_bytes: IntArray
    host_state: IntArray  # index into HOST_STATE_CODES
    guests: tuple[GuestSeries, ...]
    host_cpus: int | None = None  # processors shared, when the scenario has them
    cpus: tuple[CpuSeries, ...] = ()

    def cpu(self, name: str) -> CpuSeries:
        for c in self.cpus:
            if c.name == name:
                return c
        raise KeyError(name)

    def guest(self, name: str) -> GuestSeries:
        for g in self.guests:
            if g.name == name:
                return g
        raise KeyError(name)

    @property
    def throughput_refs_per_s(self) -> float:
        """Every guest's references together, per second of the run."""
        return sum(float(g.refs.sum()) for g in self.guests) / self.duration_s

    def summary(self) -> dict[str, Any]:
        """The JSON object ``balloonist simulate --json`` prints (shape fixed by the docs)."""
        duration = self.duration_s
        guests: dict[str, Any] = {}
        for g in self.guests:
            guests[g.name] = {
                "throughput_refs_per_s": float(g.refs.sum()) / duration,
                "mean_allocation_bytes": round(float(g.allocation_bytes.mean())),
                "min_allocation_bytes": int(g.allocation_bytes.min()),
                "final_balloon_bytes": int(g.balloon_bytes[-1]),
                "major_faults": int(g.major_faults.sum()),
            }
            if g.reported_bytes is not None:
                guests[g.name]["free_page_reported_bytes"] = int(g.reported_bytes[-1])
        summary: dict[str, Any] = {
            "scenario": self.scenario,
            "policy": self.policy,
            "seed": self.seed,
            "duration_s": duration,
            "aggregate": {
                "throughput_refs_per_s": self.throughput_refs_per_s,
                "guest_major_faults": sum(int(g.major_faults.sum()) for g in self.guests),
                "host_swap_ins": sum(int(g.host_swap_ins.sum()) for g in self.guests),
                "host_swap_outs": sum(int(g.host_swap_outs.sum()) for g in self.guests),
                "double_paging_events": sum(int(g.double_paging.sum()) for g in self.guests),
            },
            "guests": guests,
        }
        if self.host_cpus is not None:
            summary["cpu"] = self._cpu_summary()
        return summary

    def _cpu_summary(self) -> dict[str, Any]:
        duration = self.duration_s
        return {
            "host_cpus": self.host_cpus,
            "useful_cpu_s_per_s": sum(float(c.useful_cpu_s.sum()) for c in self.cpus) / duration,
            "spin_cpu_s_per_s": sum(float(c.spin_cpu_s.sum()) for c in self.cpus) / duration,
            "switch_lost_cpu_s_per_s": sum(float(c.switch_lost_cpu_s.sum()) for c in self.cpus)
            / duration,
            "guests": {
                c.name: {
                    "vcpus": c.vcpus,
                    "useful_cpu_s_per_s": float(c.useful_cpu_s.sum()) / duration,
                    "mean_online_vcpus": float(c.online_vcpus.mean()),
                }
                for c in self.cpus
            },
        }


@dataclass(frozen=True)
class GuestProgress:
    name: str
    memory_bytes: int
    allocation_bytes: int
    target_bytes: int
    balloon_bytes: int
    working_set_bytes: int
    refs_per_s: float  # over the last period
    major_faults: int  # total so far


@dataclass(frozen=True)
class Progress:
    """Handed to a progress callback after every period (live views, progress lines)."""

    period: int  # 1-based
    periods: int
    time_s: float
    host_memory_bytes: int
    host_free_bytes: int
    host_state: HostState
    guests: tuple[GuestProgress, ...]
