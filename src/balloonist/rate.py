"""Adaptive rate control for balloon inflation (the patent's AIMD).

Start at ``min``; every step that got all it asked for adds ``increase``; a step that
failed divides the rate by ``divisor``; the rate always stays in ``[min, max]``.
The rate is in *units* per step, whatever the balloon moves: pages for a memory
balloon, vCPUs for a CPU balloon. The same controller paces the in-guest driver (the
preferred place, since the guest sees its own allocation failures first), the host,
when a guest's driver cannot pace itself, and both ends of the CPU balloon.

Stdlib only: this module also runs inside guests.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimits:
    """Bounds and steps, all in units per step (pages for memory, vCPUs for processors).

    The defaults assume a 1 s step and 4 KiB pages: 4 MiB/s to start, +16 MiB/s per
    success, halved on failure, at most 1 GiB/s. The patent's prototype ran at about
    1 MB/s; guests of today fault memory in at hundreds of MB/s, and a balloon that
    cannot keep up leaves the host to page instead. Linux's virtio-balloon, unpaced,
    inflates at over 1 GB/s on KVM. Our agent steps every 0.2 s, so it ramps by 80
    MiB/s a second; the simulator's driver, stepping once a period, is given the same
    ramp per second (a scenario's ``[rate]`` table: +80 MiB a step).
    """

    min_units: int = 1024
    max_units: int = 262144
    increase_units: int = 4096
    divisor: float = 2.0

    def __post_init__(self) -> None:
        if self.min_units < 1:
            raise ValueError(f"rate min must be at least one unit, got {self.min_units}")
        if self.max_units < self.min_units:
            raise ValueError(f"rate max {self.max_units} is below min {self.min_units}")
        if self.increase_units < 0:
            raise ValueError(f"rate increase must not be negative, got {self.increase_units}")
        if self.divisor <= 1.0:
            raise ValueError(f"rate divisor must be above 1, got {self.divisor}")


class AdaptiveRate:
    """Additive increase on success, multiplicative decrease on failure."""

    def __init__(self, limits: RateLimits | None = None) -> None:
        self.limits = limits or RateLimits()
        self._step_units = self.limits.min_units
        self.successes = 0
        self.failures = 0

    @property
    def step_units(self) -> int:
        """How many units the next step may move."""
        return self._step_units

    def on_success(self) -> None:
        self.successes += 1
        self._step_units = min(self.limits.max_units, self._step_units + self.limits.increase_units)

    def on_failure(self) -> None:
        self.failures += 1
        self._step_units = max(self.limits.min_units, int(self._step_units / self.limits.divisor))

    def record(self, *, requested: int, obtained: int) -> None:
        """Account for one step: success only if it got everything it asked for. The
        two counts need only share a unit (the host's pacer gives bytes)."""
        if requested <= 0:
            return  # nothing was attempted; the rate says nothing new
        if obtained >= requested:
            self.on_success()
        else:
            self.on_failure()

    def reset(self) -> None:
        self._step_units = self.limits.min_units


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` saved up; full at the start.

    One protocol limit, two sides: the host refuses a message the bucket has no token
    for (:meth:`take`); the agent counts what it sent (:meth:`spend`, which may go
    below zero) and sends page reports only while it has tokens left (:attr:`tokens`).
    """

    def __init__(self, rate_per_s: float, burst: int, now_s: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = float(burst)
        self._at_s = now_s

    @property
    def tokens(self) -> float:
        return self._tokens

    def refill(self, now_s: float) -> None:
        elapsed_s = max(0.0, now_s - self._at_s)  # a clock that steps back adds nothing
        self._tokens = min(float(self.burst), self._tokens + elapsed_s * self.rate_per_s)
        self._at_s = now_s

    def take(self, now_s: float) -> bool:
        """One token if there is one (after refilling to ``now_s``)."""
        self.refill(now_s)
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def spend(self) -> None:
        """One token, whether or not there is one: what was sent is sent."""
        self._tokens -= 1.0
