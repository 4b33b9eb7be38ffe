"""Terminal views of a run: the rich live view, plain progress lines, the summary table.

Both progress views are callables taking one :class:`~balloonist.sim.result.Progress`
per period, so the runner needs to know nothing about terminals. The live view is for
people at a terminal; the plain lines are for logs and pipes (one flushed line every
tenth of the run, no control characters).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Final, Self, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from balloonist.model import HostState
from balloonist.sim.result import GuestProgress, Progress
from balloonist.units import format_size

__all__ = [
    "LiveView",
    "ProgressLines",
    "format_progress_line",
    "format_rate",
    "render_progress",
    "summary_table",
]

_STATE_STYLE: Final = {
    HostState.HIGH: "bold green",
    HostState.SOFT: "bold yellow",
    HostState.HARD: "bold dark_orange",
    HostState.LOW: "bold red",
}

#: Cells in a guest's allocation bar: fine enough to see a few percent move.
BAR_WIDTH: Final = 24

#: A progress line names this many guests at most, so a line stays a line.
MAX_GUESTS_PER_LINE: Final = 8


# ---------------------------------------------------------------------------------------
# Formatting shared by the views


def format_rate(per_s: float) -> str:
    """``1234567.0 -> '1.23M'``: rates are read at a glance, not to the unit."""
    for suffix, factor in (("", 1.0), ("k", 1e3), ("M", 1e6)):
        # Round first, so 999_999 becomes '1M' rather than '1e+03k'.
        value = float(f"{per_s / factor:.3g}")
        if abs(value) < 1000:
            return f"{value:g}{suffix}"
    return f"{float(f'{per_s / 1e9:.3g}'):g}G"


def _state_text(state: HostState) -> Text:
    return Text(state.value.upper(), style=_STATE_STYLE[state])


def _allocation_bar(guest: GuestProgress, width: int = BAR_WIDTH) -> Text:
    """Allocation (solid) and balloon (shaded) as parts of the configured memory."""
    memory = max(guest.memory_bytes, 1)
    alloc_cells = min(width, round(width * guest.allocation_bytes / memory))
    balloon_cells = min(width - alloc_cells, round(width * guest.balloon_bytes / memory))
    rest = width - alloc_cells - balloon_cells
    bar = Text()
    bar.append("█" * alloc_cells, style="green")
    bar.append("▒" * balloon_cells, style="magenta")
    bar.append("·" * rest, style="grey50")
    bar.append(f" {100 * guest.allocation_bytes / memory:3.0f}%")
    return bar


# ---------------------------------------------------------------------------------------
# The live view


def render_progress(progress: Progress, *, title: str) -> RenderableType:
    """One frame of the live view: time, host, and a row per guest."""
    host = Table.grid(padding=(0, 2))
    host.add_row(
        Text(f"t = {progress.time_s:.1f} s", style="bold"),
        ProgressBar(total=progress.periods, completed=progress.period, width=30),
        Text(f"period {progress.period}/{progress.periods}"),
    )
    host.add_row(
        Text("host", style="bold"),
        Text(
            f"free {format_size(progress.host_free_bytes)} "
            f"of {format_size(progress.host_memory_bytes)}"
        ),
        Text.assemble("state ", _state_text(progress.host_state)),
    )

    guests = Table(expand=False, pad_edge=False)
    guests.add_column("guest", style="bold")
    for heading in ("allocation", "balloon", "working set", "target", "refs/s", "major faults"):
        guests.add_column(heading, justify="right")
    guests.add_column("of configured: █ allocated ▒ balloon", no_wrap=True)
    for g in progress.guests:
        guests.add_row(
            g.name,
            format_size(g.allocation_bytes),
            format_size(g.balloon_bytes),
            format_size(g.working_set_bytes),
            format_size(g.target_bytes),
            format_rate(g.refs_per_s),
            str(g.major_faults),
            _allocation_bar(g),
        )
    return Panel(Group(host, guests), title=title, title_align="left", expand=False)


class LiveView:
    """A rich ``Live`` display fed one :class:`Progress` per period.

    ``min_period_wall_s`` paces the display: if the simulator is faster than that per
    period, the view waits the difference so a person can follow the run. ``clock`` and
    ``sleep`` are injected so tests run without waiting.
    """

    def __init__(
        self,
        console: Console,
        *,
        title: str,
        min_period_wall_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._title = title
        self._min_period_wall_s = min_period_wall_s
        self._clock = clock
        self._sleep = sleep
        self._last_frame_s: float | None = None
        self._live = Live(
            Text(f"{title}: starting…"),
            console=console,
            auto_refresh=False,  # we refresh once per period, when there is news
            transient=False,  # the last frame stays on screen above the summary
        )

    def __enter__(self) -> Self:
        self._live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._live.__exit__(exc_type, exc, tb)

    def __call__(self, progress: Progress) -> None:
        self._live.update(render_progress(progress, title=self._title), refresh=True)
        now = self._clock()
        if self._last_frame_s is not None and self._min_period_wall_s > 0:
            wait = self._min_period_wall_s - (now - self._last_frame_s)
            if wait > 0:
                self._sleep(wait)
                now += wait
        self._last_frame_s = now


# ---------------------------------------------------------------------------------------
# Plain progress lines


def format_progress_line(progress: Progress) -> str:
    percent = 100 * progress.period / progress.periods
    parts = [
        f"[{percent:3.0f}%] t={progress.time_s:.1f}s period {progress.period}/{progress.periods}",
        f"host free={format_size(progress.host_free_bytes)} state={progress.host_state.value}",
    ]
    for g in progress.guests[:MAX_GUESTS_PER_LINE]:
        parts.append(
            f"{g.name} alloc={format_size(g.allocation_bytes)} "
            f"balloon={format_size(g.balloon_bytes)} ws={format_size(g.working_set_bytes)} "
            f"refs/s={format_rate(g.refs_per_s)} faults={g.major_faults}"
        )
    hidden = len(progress.guests) - MAX_GUESTS_PER_LINE
    if hidden > 0:
        parts.append(f"(+{hidden} more guests)")
    return " | ".join(parts)


class ProgressLines:
    """Prints one flushed line every ``fraction`` of the run, and one at the end."""

    def __init__(self, stream: TextIO, *, fraction: float = 0.1) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self._stream = stream
        self._fraction = fraction

    def __call__(self, progress: Progress) -> None:
        step = max(1, math.ceil(progress.periods * self._fraction))
        if progress.period % step == 0 or progress.period == progress.periods:
            print(format_progress_line(progress), file=self._stream, flush=True)


# ---------------------------------------------------------------------------------------
# The summary


def summary_table(summary: Mapping[str, Any]) -> RenderableType:
    """Render ``SimResult.summary()`` (the ``--json`` object), so both show the same numbers."""
    guests = Table(
        title=f"{summary['scenario']}, policy {summary['policy']}, seed {summary['seed']}, "
        f"{summary['duration_s']:g} s simulated",
        title_justify="left",
    )
    guests.add_column("guest", style="bold")
    for heading in (
        "throughput (refs/s)",
        "mean allocation",
        "min allocation",
        "final balloon",
        "major faults",
    ):
        guests.add_column(heading, justify="right")
    for name, g in summary["guests"].items():
        guests.add_row(
            name,
            format_rate(g["throughput_refs_per_s"]),
            format_size(g["mean_allocation_bytes"]),
            format_size(g["min_allocation_bytes"]),
            format_size(g["final_balloon_bytes"]),
            str(g["major_faults"]),
        )
    agg = summary["aggregate"]
    guests.add_section()
    guests.add_row(
        "all guests",
        format_rate(agg["throughput_refs_per_s"]),
        "",
        "",
        "",
        str(agg["guest_major_faults"]),
        style="bold",
    )

    host = Table(title="host paging", title_justify="left")
    for heading in ("host swap-ins", "host swap-outs", "double paging events"):
        host.add_column(heading, justify="right")
    host.add_row(
        str(agg["host_swap_ins"]), str(agg["host_swap_outs"]), str(agg["double_paging_events"])
    )
    cpu = summary.get("cpu")
    if cpu is None:
        return Group(guests, host)
    processors = Table(
        title=f"processors: {cpu['host_cpus']} shared (the CPU balloon)", title_justify="left"
    )
    processors.add_column("guest", style="bold")
    for heading in ("vCPUs", "mean online", "useful CPU-s/s"):
        processors.add_column(heading, justify="right")
    for name, g in cpu["guests"].items():
        processors.add_row(
            name, str(g["vcpus"]), f"{g['mean_online_vcpus']:.1f}", f"{g['useful_cpu_s_per_s']:.2f}"
        )
    processors.add_section()
    processors.add_row("all guests", "", "", f"{cpu['useful_cpu_s_per_s']:.2f}", style="bold")
    return Group(guests, host, processors)
