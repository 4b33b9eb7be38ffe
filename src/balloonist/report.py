"""Report files for one simulation run: summary JSON, time-series CSV, PNG plots.

``write_report`` is all-or-nothing: it writes into a hidden directory next to the
target and renames it into place, so a failed or interrupted run never leaves a
half-written report, and it refuses to mix its files into a non-empty directory.

Plots use matplotlib's Agg canvas directly on a ``Figure`` instead of ``pyplot``:
that needs no display and leaves the process-wide backend and pyplot's figure
registry alone, so importing this module changes nothing for its caller.
Sizes on plots are in MiB; everything in the CSV files is in bytes, pages or counts.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from balloonist.atomicfile import staged
from balloonist.errors import ConfigError
from balloonist.model import HostState
from balloonist.sim.result import HOST_STATE_CODES, FloatArray, GuestSeries, SimResult
from balloonist.units import MIB

__all__ = [
    "HOST_COLUMNS",
    "REPORT_FILES",
    "TIMESERIES_COLUMNS",
    "check_report_dir",
    "plot_host",
    "plot_memory",
    "plot_overview",
    "plot_throughput",
    "write_host_csv",
    "write_png_atomic",
    "write_report",
    "write_summary_json",
    "write_timeseries_csv",
]

#: One row per period per guest; a guest's counters are per period, not cumulative.
TIMESERIES_COLUMNS: Final = (
    "time_s",
    "guest",
    "allocation_bytes",
    "target_bytes",
    "balloon_bytes",
    "balloon_target_bytes",
    "working_set_bytes",
    "refs",
    "major_faults",
    "guest_swap_outs",
    "host_swap_ins",
    "host_swap_outs",
    "double_paging",
    "balloon_rate_pages",
)

HOST_COLUMNS: Final = ("time_s", "host_free_bytes", "host_swap_used_bytes", "host_state")

#: What ``write_report`` creates, in this order.
REPORT_FILES: Final = (
    "summary.json",
    "timeseries.csv",
    "host.csv",
    "memory.png",
    "host.png",
    "throughput.png",
)

#: One panel (or line) per guest stays legible up to about a dozen guests; beyond
#: that the plots show the first ones and say so in the title (the CSV has them all).
MAX_PLOTTED_GUESTS: Final = 12

_STATE_COLOURS: Final = {
    HostState.HIGH: "#2ca02c",
    HostState.SOFT: "#ffdd57",
    HostState.HARD: "#ff7f0e",
    HostState.LOW: "#d62728",
}
#: Light enough that the lines drawn over the state shading stay readable.
_STATE_ALPHA: Final = 0.18
_DPI: Final = 100


# ---------------------------------------------------------------------------------------
# The whole report


def check_report_dir(directory: Path) -> None:
    """Refuse a report directory we could not fill cleanly, before any work is done.

    Fine: a path that does not exist yet (parents are created) or an empty directory.
    Refused: an existing file, a non-empty directory, a path under an existing file.
    """
    if directory.exists():
        if not directory.is_dir():
            raise ConfigError("exists and is not a directory", where=f"report {directory}")
        if any(directory.iterdir()):
            raise ConfigError(
                "directory exists and is not empty; choose a new one so reports are not mixed",
                where=f"report {directory}",
            )
        return
    ancestor = directory.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{ancestor} is not a directory", where=f"report {directory}")


@contextmanager
def staged_report_dir(directory: Path) -> Iterator[Path]:
    """A hidden directory beside ``directory`` to write a report into; renamed into
    place when the block ends, removed if it raises: the report is all or nothing."""
    check_report_dir(directory)
    parent = directory.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    # Same parent, so the final rename stays on one file system and is atomic.
    staging = parent / f".{directory.name}.tmp-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
        try:
            # rename(2) replaces a missing or empty directory and fails on a non-empty one.
            os.replace(staging, directory)
        except OSError as exc:
            raise ConfigError(
                f"cannot move the report into place: {exc.strerror}", where=f"report {directory}"
            ) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_report(result: SimResult, directory: Path) -> list[Path]:
    """Write every file in :data:`REPORT_FILES` into ``directory``, all or nothing."""
    writers: tuple[Callable[[SimResult, Path], None], ...] = (
        write_summary_json,
        write_timeseries_csv,
        write_host_csv,
        plot_memory,
        plot_host,
        plot_throughput,
    )
    with staged_report_dir(directory) as staging:
        for name, write in zip(REPORT_FILES, writers, strict=True):
            write(result, staging / name)
    return [directory / name for name in REPORT_FILES]


# ---------------------------------------------------------------------------------------
# Data files


def write_summary_json(result: SimResult, path: Path) -> None:
    """``SimResult.summary()``, the same object ``simulate --json`` prints."""
    path.write_text(json.dumps(result.summary(), indent=2) + "\n", encoding="utf-8")


def write_timeseries_csv(result: SimResult, path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(TIMESERIES_COLUMNS)
        columns = [
            (
                g.name,
                g.allocation_bytes,
                g.target_bytes,
                g.balloon_bytes,
                g.balloon_target_bytes,
                g.working_set_bytes,
                g.refs,
                g.major_faults,
                g.guest_swap_outs,
                g.host_swap_ins,
                g.host_swap_outs,
                g.double_paging,
                g.balloon_rate_pages,
            )
            for g in result.guests
        ]
        for i, time_s in enumerate(result.time_s.tolist()):
            for name, *series in columns:
                out.writerow([time_s, name, *(int(s[i]) for s in series)])


def write_host_csv(result: SimResult, path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(HOST_COLUMNS)
        for time_s, free, swap_used, code in zip(
            result.time_s.tolist(),
            result.host_free_bytes.tolist(),
            result.host_swap_used_bytes.tolist(),
            result.host_state.tolist(),
            strict=True,
        ):
            out.writerow([time_s, free, swap_used, HOST_STATE_CODES[code].value])


# ---------------------------------------------------------------------------------------
# Plots


def plot_memory(result: SimResult, path: Path) -> None:
    """One panel per guest: allocation, balloon, working-set estimate and target."""
    shown = result.guests[:MAX_PLOTTED_GUESTS]
    fig = Figure(figsize=(10, 2.4 * len(shown) + 1.0), dpi=_DPI, layout="constrained")
    axes = fig.subplots(len(shown), 1, sharex=True, squeeze=False)[:, 0]
    for ax, guest in zip(axes, shown, strict=True):
        _draw_guest_memory(ax, result.time_s, guest)
    axes[-1].set_xlabel("simulated time (s)")
    axes[0].legend(loc="upper right", fontsize="small", ncols=5)
    fig.suptitle(_title(result, "guest memory" + _more_guests(result)))
    _save(fig, path)


def plot_host(result: SimResult, path: Path) -> None:
    """Host free memory and host swap in use, on the host state shaded in the background."""
    fig = Figure(figsize=(10, 4), dpi=_DPI, layout="constrained")
    ax = fig.subplots()
    _draw_host(ax, result)
    ax.set_xlabel("simulated time (s)")
    ax.set_title(_title(result, "host memory and state"))
    _save(fig, path)


def plot_throughput(result: SimResult, path: Path) -> None:
    """Page references completed per simulated second, per guest."""
    fig = Figure(figsize=(10, 4), dpi=_DPI, layout="constrained")
    ax = fig.subplots()
    for guest in result.guests[:MAX_PLOTTED_GUESTS]:
        ax.plot(result.time_s, guest.refs / result.period_s, label=guest.name)
    ax.set_ylabel("page references / s")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    ax.set_title(_title(result, "throughput" + _more_guests(result)))
    _save(fig, path)


def plot_overview(result: SimResult, path: Path) -> None:
    """The demo's one picture: the guests' memory panels above the host panel."""
    shown = result.guests[:MAX_PLOTTED_GUESTS]
    fig = Figure(figsize=(10, 2.4 * (len(shown) + 1) + 1.0), dpi=_DPI, layout="constrained")
    axes = fig.subplots(len(shown) + 1, 1, sharex=True, squeeze=False)[:, 0]
    for ax, guest in zip(axes[:-1], shown, strict=True):
        _draw_guest_memory(ax, result.time_s, guest)
    axes[0].legend(loc="upper right", fontsize="small", ncols=5)
    _draw_host(axes[-1], result)
    axes[-1].set_xlabel("simulated time (s)")
    fig.suptitle(_title(result, "guest and host memory" + _more_guests(result)))
    write_png_atomic(fig, path)


def write_png_atomic(fig: Figure, path: Path) -> None:
    """Save next to ``path`` and rename, so a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged(path, mode=0o666) as staging:
        _save(fig, staging)


def _draw_guest_memory(ax: Axes, time_s: FloatArray, guest: GuestSeries) -> None:
    ax.plot(time_s, guest.allocation_bytes / MIB, label="allocation", linewidth=2)
    ax.plot(time_s, guest.balloon_bytes / MIB, label="balloon")
    ax.plot(time_s, guest.working_set_bytes / MIB, label="working-set estimate")
    ax.plot(time_s, guest.target_bytes / MIB, label="target", linestyle="--")
    ax.axhline(
        guest.memory_bytes / MIB, color="grey", linestyle=":", linewidth=1, label="configured"
    )
    ax.set_ylim(0, guest.memory_bytes / MIB * 1.08)
    ax.set_ylabel("MiB")
    ax.set_title(f"guest {guest.name}", loc="left", fontsize="medium")
    ax.grid(alpha=0.3)


def _draw_host(ax: Axes, result: SimResult) -> None:
    for state, start_s, end_s in _state_runs(result):
        ax.axvspan(start_s, end_s, color=_STATE_COLOURS[state], alpha=_STATE_ALPHA, linewidth=0)
    ax.plot(result.time_s, result.host_free_bytes / MIB, label="host free", linewidth=2)
    ax.plot(result.time_s, result.host_swap_used_bytes / MIB, label="host swap used")
    ax.axhline(
        result.host_memory_bytes / MIB, color="grey", linestyle=":", linewidth=1, label="host total"
    )
    ax.set_ylim(bottom=0)
    ax.set_xlim(float(result.time_s[0]) - result.period_s, float(result.time_s[-1]))
    ax.set_ylabel("MiB")
    ax.grid(alpha=0.3)
    state_keys = [
        Patch(facecolor=_STATE_COLOURS[s], alpha=_STATE_ALPHA * 2, label=f"state {s.value}")
        for s in HOST_STATE_CODES
    ]
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=[*handles, *state_keys], loc="upper right", fontsize="small", ncols=2)


def _state_runs(result: SimResult) -> Iterator[tuple[HostState, float, float]]:
    """Maximal runs of one host state as (state, start_s, end_s); a sample closes its period."""
    codes = result.host_state
    if codes.size == 0:
        return
    # Indices where the state changes start new runs.
    starts = np.flatnonzero(np.diff(codes)) + 1
    bounds = [0, *starts.tolist(), int(codes.size)]
    for first, stop in itertools.pairwise(bounds):
        yield (
            HOST_STATE_CODES[int(codes[first])],
            float(result.time_s[first]) - result.period_s,
            float(result.time_s[stop - 1]),
        )


def _title(result: SimResult, what: str) -> str:
    return f"{result.scenario} (policy {result.policy}): {what}"


def _more_guests(result: SimResult) -> str:
    hidden = len(result.guests) - MAX_PLOTTED_GUESTS
    return f" (first {MAX_PLOTTED_GUESTS} of {len(result.guests)} guests)" if hidden > 0 else ""


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)  # attaches itself to the figure
    fig.savefig(path, format="png")
