"""The pressure guard: how large the balloon may be without hurting the guest's own
processes (see :mod:`balloonist.agent.main`). Pure: a sample in, a verdict out.
Stdlib only, Python 3.9."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from balloonist.agent.pressure import PressureSample

MIB = 1 << 20


@dataclass(frozen=True)
class Verdict:
    limit_pages: int  # the largest balloon the guest's pressure allows now
    on: bool  # the guard holds the balloon back (the inflation rate should drop)
    changed: bool  # ``on`` differs from the last verdict
    what: str  # the figures, for a log line or an ``error`` message


class PressureGuard:
    """The balloon never leaves less than the floor of ``MemAvailable`` (below it, the
    shortfall goes back), and does not grow while PSI "some" avg10 is over its limit.

    ``floor_for(mem_total_bytes)`` gives the floor for a guest of that size.
    """

    def __init__(
        self, floor_for: Callable[[int], int], psi_limit_percent: float, page_size_bytes: int
    ) -> None:
        self._floor_for = floor_for
        self._psi_limit_percent = psi_limit_percent
        self._page_size_bytes = page_size_bytes
        self.on = False

    def judge(self, sample: PressureSample, size_pages: int) -> Verdict:
        floor = self._floor_for(sample.mem_total_bytes)
        # Floor division rounds a shortfall up to whole pages.
        headroom_pages = (sample.mem_available_bytes - floor) // self._page_size_bytes
        limit = max(0, size_pages + headroom_pages)
        psi_high = sample.psi_some_avg10 > self._psi_limit_percent
        if psi_high:
            limit = min(limit, size_pages)
        on = sample.mem_available_bytes < floor or psi_high
        changed, self.on = on != self.on, on
        what = (
            f"MemAvailable {sample.mem_available_bytes // MIB} MiB (floor {floor // MIB}),"
            f" PSI some {sample.psi_some_avg10:.1f} % (limit {self._psi_limit_percent:g})"
        )
        return Verdict(limit, on, changed, what)
