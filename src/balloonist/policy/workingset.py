"""Working-set estimation from sampled activity (ESX's statistical sampling), and the
same averages of CPU demand for guests whose processors are shared.

Each period the VMM watches ``n`` random pages of a guest and reports how many were
touched; ``fraction x allocated`` is that period's observation. The estimate is the
larger of a fast and a slow exponentially weighted moving average of the observations,
so it rises quickly when a guest becomes busy and falls slowly when it goes idle
(memory taken from a guest that was only briefly quiet is expensive to give back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class EstimatorParams:
    fast_halflife_s: float = 5.0  # follows a growing working set within a few periods
    slow_halflife_s: float = 30.0  # forgets a shrinking one over a minute or two

    def __post_init__(self) -> None:
        if not 0.0 < self.fast_halflife_s <= self.slow_halflife_s:
            raise ValueError(
                "working-set half-lives must satisfy 0 < fast <= slow, got "
                f"{self.fast_halflife_s}, {self.slow_halflife_s}"
            )


@dataclass(frozen=True)
class EstimateState:
    fast_bytes: float
    slow_bytes: float

    @property
    def estimate_bytes(self) -> int:
        return round(max(self.fast_bytes, self.slow_bytes))


def _gain(period_s: float, halflife_s: float) -> float:
    return 1.0 - math.pow(0.5, period_s / halflife_s)


def _fold(
    fast: float, slow: float, observed: float, period_s: float, params: EstimatorParams
) -> tuple[float, float]:
    return (
        fast + _gain(period_s, params.fast_halflife_s) * (observed - fast),
        slow + _gain(period_s, params.slow_halflife_s) * (observed - slow),
    )


def update_estimate(
    state: EstimateState | None, observed_bytes: int, period_s: float, params: EstimatorParams
) -> EstimateState:
    """Fold one observation into the averages; the first observation seeds both."""
    if state is None:
        return EstimateState(float(observed_bytes), float(observed_bytes))
    return EstimateState(
        *_fold(state.fast_bytes, state.slow_bytes, observed_bytes, period_s, params)
    )


@dataclass(frozen=True)
class CpuDemandState:
    """The same two averages, of a guest's CPU demand (vCPUs busy): it may take a
    processor as soon as it gets busy, and keeps it through a brief lull."""

    fast_vcpus: float
    slow_vcpus: float

    @property
    def estimate_vcpus(self) -> float:
        return max(self.fast_vcpus, self.slow_vcpus)


def update_cpu_demand(
    state: CpuDemandState | None, observed_vcpus: float, period_s: float, params: EstimatorParams
) -> CpuDemandState:
    """:func:`update_estimate` for CPU demand."""
    if state is None:
        return CpuDemandState(observed_vcpus, observed_vcpus)
    return CpuDemandState(
        *_fold(state.fast_vcpus, state.slow_vcpus, observed_vcpus, period_s, params)
    )


#: Half-life of the fault and stall rates: a guest that starts to thrash shows within
#: a period or two, and one burst of faults fades within a few seconds.
PRESSURE_HALFLIFE_S = 2.0


@dataclass(frozen=True)
class PressureState:
    """A guest's cumulative counters at its last sample, and the smoothed rates."""

    time_s: float
    major_faults: int
    memory_stall_s: float | None
    major_faults_per_s: float = 0.0
    stall_fraction: float | None = None
    major_faults_per_s_now: float = 0.0  # over the last interval alone
    stall_fraction_now: float | None = None


def update_pressure(
    state: PressureState | None, time_s: float, major_faults: int, memory_stall_s: float | None
) -> PressureState:
    """Fold one sample's counters into the rates. A counter that went backwards (a
    guest rebooted, a new agent) restarts its rate instead of going negative."""
    if state is None or time_s <= state.time_s:
        return PressureState(time_s, major_faults, memory_stall_s)
    elapsed = time_s - state.time_s
    gain = _gain(elapsed, PRESSURE_HALFLIFE_S)
    faults = max(0, major_faults - state.major_faults) / elapsed
    rate = state.major_faults_per_s + gain * (faults - state.major_faults_per_s)
    stall: float | None = None
    now: float | None = None
    if memory_stall_s is not None and state.memory_stall_s is not None:
        now = min(1.0, max(0.0, memory_stall_s - state.memory_stall_s) / elapsed)
        before = state.stall_fraction if state.stall_fraction is not None else now
        stall = before + gain * (now - before)
    return PressureState(time_s, major_faults, memory_stall_s, rate, stall, faults, now)
