"""The resource scheduler's loop: collect -> decide -> act, with time injected.

``Hypervisor`` is the port to whatever runs the guests (the simulator, QEMU, a fake in
tests). Each period the scheduler collects a host reading and guest samples, folds
them into the state it keeps between periods (the host free-memory state with its
hysteresis, each guest's working-set and CPU-demand averages), builds a frozen
``Snapshot``, asks the pure policy for a ``Decision`` and hands that to the hypervisor
to act on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from balloonist.model import (
    Decision,
    GuestSample,
    GuestSpec,
    GuestView,
    HostReading,
    HostSample,
    HostState,
    MemoryPressure,
    Snapshot,
)
from balloonist.policy import Policy
from balloonist.policy.hoststate import StateThresholds, next_host_state
from balloonist.policy.workingset import (
    CpuDemandState,
    EstimateState,
    EstimatorParams,
    PressureState,
    update_cpu_demand,
    update_estimate,
    update_pressure,
)


class Hypervisor(Protocol):
    """What the scheduler needs from a backend."""

    def specs(self) -> Sequence[GuestSpec]: ...

    def read_host(self) -> HostReading: ...

    def sample_guests(self) -> Sequence[GuestSample]: ...

    def apply(self, decision: Decision) -> None: ...


@dataclass(frozen=True)
class Cycle:
    """One period's input and output, kept for reports and tests."""

    snapshot: Snapshot
    decision: Decision


class Scheduler:
    def __init__(
        self,
        hypervisor: Hypervisor,
        policy: Policy,
        *,
        period_s: float,
        estimator: EstimatorParams | None = None,
        thresholds: StateThresholds | None = None,
    ) -> None:
        self._hv = hypervisor
        self._policy = policy
        self._period_s = period_s
        self._estimator = estimator or EstimatorParams()
        self._thresholds = thresholds or StateThresholds()
        self._state = HostState.HIGH
        self._estimates: dict[str, EstimateState] = {}
        self._observed_at: dict[str, float] = {}
        self._cpu_demand: dict[str, CpuDemandState] = {}
        self._pressure: dict[str, PressureState] = {}

    @property
    def host_state(self) -> HostState:
        return self._state

    @property
    def policy(self) -> Policy:
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        """Decide with ``policy`` from the next step on; what was learned is kept."""
        self._policy = policy

    def estimates(self) -> dict[str, tuple[EstimateState, float]]:
        """Each guest's working-set averages and when they last took an observation."""
        return {
            name: (state, self._observed_at[name])
            for name, state in self._estimates.items()
            if name in self._observed_at
        }

    def restore_estimate(self, name: str, state: EstimateState, observed_at_s: float) -> None:
        """Continue from averages saved earlier (a daemon restarted on the same clock)."""
        self._estimates[name] = state
        self._observed_at[name] = observed_at_s

    def collect(self) -> Snapshot:
        # Guests first: a backend may derive the host's free memory from what the guests
        # hold now (the QEMU daemon does), so both must describe the same moment.
        samples = {s.name: s for s in self._hv.sample_guests()}
        reading = self._hv.read_host()
        # How short the host is: by its own count where the backend reads one (real
        # VMs hold less than their balloons allow), else by the balloons' sizes.
        truth = reading.truth
        free_fraction = (
            truth.free_fraction if truth is not None else reading.free_bytes / reading.memory_bytes
        )
        self._state = next_host_state(self._state, free_fraction, self._thresholds)
        host = HostSample(
            time_s=reading.time_s,
            memory_bytes=reading.memory_bytes,
            free_bytes=reading.free_bytes,
            swap_bytes=reading.swap_bytes,
            swap_used_bytes=reading.swap_used_bytes,
            state=self._state,
            cpus=reading.cpus,
            truth=reading.truth,
        )
        views: list[GuestView] = []
        for spec in self._hv.specs():
            sample = samples.get(spec.name)
            if sample is None:
                continue  # a guest that did not report is left out of this cycle, not guessed
            working, recent = self._estimate(sample, reading.time_s)
            views.append(
                GuestView(
                    spec,
                    sample,
                    working,
                    self._cpu_estimate(sample),
                    recent_working_set_bytes=recent,
                    pressure=self._pressure_of(sample, reading.time_s),
                )
            )
        return Snapshot(reading.time_s, self._period_s, host, tuple(views))

    def _cpu_estimate(self, sample: GuestSample) -> float | None:
        cpu = sample.cpu
        if cpu is None:
            return None
        previous = self._cpu_demand.get(sample.name)
        if cpu.demand_vcpus is None:
            # Nothing measured: as for memory, assume it uses all it has.
            return previous.estimate_vcpus if previous else float(cpu.online_vcpus)
        state = update_cpu_demand(previous, cpu.demand_vcpus, self._period_s, self._estimator)
        self._cpu_demand[sample.name] = state
        return state.estimate_vcpus

    def _pressure_of(self, sample: GuestSample, now_s: float) -> MemoryPressure | None:
        previous = self._pressure.get(sample.name)
        state = update_pressure(previous, now_s, sample.major_faults, sample.memory_stall_s)
        self._pressure[sample.name] = state
        if previous is None:
            return None  # one sample gives no rate
        return MemoryPressure(
            state.major_faults_per_s,
            state.stall_fraction,
            state.major_faults_per_s_now,
            state.stall_fraction_now,
        )

    def _estimate(self, sample: GuestSample, now_s: float) -> tuple[int, int]:
        """The working-set estimate, and the fast average's part of it alone."""
        previous = self._estimates.get(sample.name)
        observed = sample.active_bytes_observed
        if observed is None:
            # No closed window this period: keep what we knew; with nothing known, assume
            # everything the guest holds is in use (never tax a guest on no evidence).
            known = previous.estimate_bytes if previous else sample.allocated_bytes
            recent = round(previous.fast_bytes) if previous else known
        else:
            # Windows may close less often than once a period; the averages decay by
            # the time that actually passed.
            elapsed = now_s - self._observed_at.get(sample.name, now_s - self._period_s)
            state = update_estimate(previous, observed, max(elapsed, 1e-9), self._estimator)
            self._estimates[sample.name] = state
            self._observed_at[sample.name] = now_s
            known = state.estimate_bytes
            recent = round(state.fast_bytes)
        # ESX's third average: the open window's pages touched so far can only be a
        # lower bound on its final count, so they may raise the estimate at once (a
        # guest that just got busy) but never lower it.
        so_far = sample.active_bytes_so_far
        if so_far is None:
            return known, recent
        return max(known, so_far), max(recent, so_far)

    def step(self) -> Cycle:
        snapshot = self.collect()
        decision = self._policy.decide(snapshot)
        self._hv.apply(decision)
        return Cycle(snapshot, decision)
