"""Adaptive rate control for balloon inflation (the patent's AIMD).

Start at ``min``; every step that got all it asked for adds ``increase``; a step that
failed divides the rate by ``divisor``; the rate always stays in ``[min, max]``.
The rate is in pages per step. The same controller paces the in-guest driver (the
preferred place, since the guest sees its own allocation failures first) and the host,
when a guest's driver cannot pace itself.

Stdlib only: this module also runs inside guests.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimits:
    """Bounds and steps, all in pages per step.

    The defaults assume a 1 s step and 4 KiB pages: 4 MiB/s to start, +16 MiB/s per
    success, halved on failure, at most 1 GiB/s. The patent's prototype ran at about
    1 MB/s; guests of today fault memory in at hundreds of MB/s, and a balloon that
    cannot keep up leaves the host to page instead. Linux's virtio-balloon, unpaced,
    inflates at over 1 GB/s on KVM.
    """

    min_pages: int = 1024
    max_pages: int = 262144
    increase_pages: int = 4096
    divisor: float = 2.0

    def __post_init__(self) -> None:
        if self.min_pages < 1:
            raise ValueError(f"rate min must be at least one page, got {self.min_pages}")
        if self.max_pages < self.min_pages:
            raise ValueError(f"rate max {self.max_pages} is below min {self.min_pages}")
        if self.increase_pages < 0:
            raise ValueError(f"rate increase must not be negative, got {self.increase_pages}")
        if self.divisor <= 1.0:
            raise ValueError(f"rate divisor must be above 1, got {self.divisor}")


class AdaptiveRate:
    """Additive increase on success, multiplicative decrease on failure."""

    def __init__(self, limits: RateLimits | None = None) -> None:
        self.limits = limits or RateLimits()
        self._rate_pages = self.limits.min_pages
        self.successes = 0
        self.failures = 0

    @property
    def rate_pages(self) -> int:
        """How many pages the next step may move."""
        return self._rate_pages

    def on_success(self) -> None:
        self.successes += 1
        self._rate_pages = min(self.limits.max_pages, self._rate_pages + self.limits.increase_pages)

    def on_failure(self) -> None:
        self.failures += 1
        self._rate_pages = max(self.limits.min_pages, int(self._rate_pages / self.limits.divisor))

    def record(self, *, requested: int, obtained: int) -> None:
        """Account for one step: success only if it got everything it asked for."""
        if requested <= 0:
            return  # nothing was attempted; the rate says nothing new
        if obtained >= requested:
            self.on_success()
        else:
            self.on_failure()

    def reset(self) -> None:
        self._rate_pages = self.limits.min_pages
