"""Host free-memory states with hysteresis (ESX's high / soft / hard / low).

The state falls as soon as free memory drops below a state's threshold (soft 4 %,
hard 2 %, low 1 % of host memory), and climbs back one state at a time only when free
memory exceeds the threshold of the state above (high 6 %, soft 4 %, hard 2 %). The
gap between falling and climbing is the hysteresis that keeps the host from flapping
between mechanisms every period.
"""

from __future__ import annotations

from dataclasses import dataclass

from balloonist.model import HostState


@dataclass(frozen=True)
class StateThresholds:
    """Fractions of host memory; each state is entered below its own threshold."""

    high: float = 0.06
    soft: float = 0.04
    hard: float = 0.02
    low: float = 0.01

    def __post_init__(self) -> None:
        if not 0.0 < self.low < self.hard < self.soft < self.high < 1.0:
            raise ValueError(
                "host state thresholds must satisfy 0 < low < hard < soft < high < 1, got "
                f"{self.low}, {self.hard}, {self.soft}, {self.high}"
            )


def next_host_state(
    previous: HostState, free_fraction: float, thresholds: StateThresholds | None = None
) -> HostState:
    t = thresholds or StateThresholds()
    # Falling: straight to the lowest state whose threshold free memory is under.
    if free_fraction < t.low:
        level = HostState.LOW
    elif free_fraction < t.hard:
        level = HostState.HARD
    elif free_fraction < t.soft:
        level = HostState.SOFT
    else:
        level = HostState.HIGH
    if level.rank >= previous.rank:
        return level
    # Climbing: one state at a time, and only past the threshold of the state above.
    climb_to = {
        HostState.LOW: (HostState.HARD, t.hard),
        HostState.HARD: (HostState.SOFT, t.soft),
        HostState.SOFT: (HostState.HIGH, t.high),
    }
    upper, threshold = climb_to[previous]
    return upper if free_fraction > threshold else previous
