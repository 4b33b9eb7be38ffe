"""Terminal views of one scenario run under several policies (``balloonist demo``).

The progress views take one :class:`~balloonist.sim.compare.PolicyProgress` at a time:
rich bars at a terminal, plain flushed lines elsewhere. The table and the verdict read
only ``SimResult.summary()`` objects, the same figures ``compare.json`` holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Self, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from balloonist.live import format_rate
from balloonist.sim.compare import PolicyProgress

__all__ = ["CompareBars", "CompareLines", "compare_table", "verdict"]

#: Guests given a throughput column of their own; more would not fit in 100 columns.
MAX_GUEST_COLUMNS: Final = 4

#: A guest column's heading is cut to this many characters.
GUEST_HEADING_CHARS: Final = 8

Summary = Mapping[str, Any]


def _throughput(summary: Summary) -> float:
    return float(summary["aggregate"]["throughput_refs_per_s"])


def _faults(summary: Summary) -> int:
    return int(summary["aggregate"]["guest_major_faults"])


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base > 0 else "-"


def compare_table(summaries: Mapping[str, Summary], *, baseline: str, baseline_note: str) -> Table:
    """One row per policy, ``baseline`` first and marked with ``baseline_note``."""
    base = summaries[baseline]
    first = next(iter(summaries.values()))
    guest_names = list(first["guests"])[:MAX_GUEST_COLUMNS]
    hidden = len(first["guests"]) - len(guest_names)
    title = (
        f"{first['scenario']} under each policy, {first['duration_s']:g} s simulated; "
        "throughput in page references/s"
    )
    if hidden > 0:
        title += f" (+{hidden} guests not shown)"
    table = Table(title=title, title_justify="left")
    table.add_column("policy", style="bold", no_wrap=True)
    table.add_column("all\nguests", justify="right")
    table.add_column(f"vs\n{baseline}", justify="right")
    table.add_column("major\nfaults", justify="right")
    table.add_column("double\npaging", justify="right")
    for name in guest_names:
        heading = name if len(name) <= GUEST_HEADING_CHARS else name[: GUEST_HEADING_CHARS - 1]
        table.add_column(heading + ("…" if heading != name else ""), justify="right")
    order = [baseline, *(name for name in summaries if name != baseline)]
    for name in order:
        s = summaries[name]
        agg = s["aggregate"]
        table.add_row(
            f"{name} ({baseline_note})" if name == baseline else name,
            format_rate(_throughput(s)),
            _ratio(_throughput(s), _throughput(base)),
            # Counts at a glance like the rates; the verdict gives the exact ones.
            format_rate(_faults(s)),
            format_rate(int(agg["double_paging_events"])),
            *(format_rate(s["guests"][g]["throughput_refs_per_s"]) for g in guest_names),
        )
    return table


def verdict(summaries: Mapping[str, Summary], *, baseline: str, baseline_note: str) -> str:
    """One sentence: which policy gave the guests the most throughput, and by how much."""
    if len(summaries) < 2:
        return f"only {baseline} ran; there is nothing to compare it with."
    ranked = sorted(summaries, key=lambda name: _throughput(summaries[name]), reverse=True)
    best = _throughput(summaries[ranked[0]])
    tied = [name for name in ranked if _throughput(summaries[name]) == best]
    if len(tied) > 1:
        return f"{_and(tied)} tied for the most throughput, {format_rate(best)} refs/s."
    winner = ranked[0]
    # Against the baseline, or, when the baseline won, against the runner-up.
    other = ranked[1] if winner == baseline else baseline

    def label(name: str) -> str:
        return f"{name} ({baseline_note})" if name == baseline else name

    return (
        f"{label(winner)} won: {_ratio(best, _throughput(summaries[other]))} the throughput "
        f"of {label(other)}, with {format_rate(_faults(summaries[winner]))} guest major "
        f"faults to its {format_rate(_faults(summaries[other]))}."
    )


def _and(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


# ---------------------------------------------------------------------------------------
# Progress


class CompareLines:
    """Plain progress: one flushed line each tenth of all the runs' periods, and at the end."""

    def __init__(self, stream: TextIO, names: Sequence[str], *, periods: int) -> None:
        self._stream = stream
        self._done = dict.fromkeys(names, 0)
        self._periods = periods
        self._last_tenth = 0

    def __call__(self, report: PolicyProgress) -> None:
        self._done[report.policy] = report.period
        total = self._periods * len(self._done)
        done = sum(self._done.values())
        tenth = 10 * done // total
        if tenth > self._last_tenth:
            self._last_tenth = tenth
            runs = ", ".join(f"{name} {p}/{self._periods}" for name, p in self._done.items())
            print(f"[{100 * done / total:3.0f}%] comparing: {runs}", file=self._stream, flush=True)


class CompareBars:
    """A rich progress bar per policy, redrawn on each report (no drawing thread)."""

    def __init__(self, console: Console, names: Sequence[str], *, periods: int) -> None:
        self._progress = RichProgress(
            TextColumn("{task.description}", style="bold"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            console=console,
            auto_refresh=False,  # no thread: worker processes may be forked meanwhile
            transient=False,
        )
        self._tasks = {name: self._progress.add_task(name, total=periods) for name in names}

    def __enter__(self) -> Self:
        self._progress.start()
        self._progress.refresh()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def __call__(self, report: PolicyProgress) -> None:
        self._progress.update(self._tasks[report.policy], completed=report.period)
        self._progress.refresh()
