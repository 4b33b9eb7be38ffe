"""Report writing: which files appear, what the CSVs hold, and that it is all or nothing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from balloonist import report
from balloonist.errors import ConfigError
from balloonist.model import HostState
from balloonist.sim.result import HOST_STATE_CODES, GuestSeries, SimResult
from balloonist.units import MIB

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _guest(name: str, periods: int, seed: int) -> GuestSeries:
    rng = np.random.default_rng(seed)

    def ints(low: int, high: int) -> np.ndarray[tuple[int], np.dtype[np.int64]]:
        return rng.integers(low, high, size=periods, dtype=np.int64)

    return GuestSeries(
        name=name,
        memory_bytes=1024 * MIB,
        allocation_bytes=ints(100 * MIB, 1024 * MIB),
        target_bytes=ints(100 * MIB, 1024 * MIB),
        balloon_bytes=ints(0, 500 * MIB),
        balloon_target_bytes=ints(0, 500 * MIB),
        working_set_bytes=ints(0, 800 * MIB),
        refs=ints(0, 1_000_000),
        major_faults=ints(0, 100),
        guest_swap_outs=ints(0, 100),
        host_swap_ins=ints(0, 100),
        host_swap_outs=ints(0, 100),
        double_paging=ints(0, 10),
        balloon_rate_pages=ints(256, 65536),
    )


def build_result(
    *,
    periods: int = 6,
    names: tuple[str, ...] = ("busy", "idle"),
    states: tuple[HostState, ...] | None = None,
    period_s: float = 0.5,
) -> SimResult:
    """A hand-made result; ``states`` defaults to HIGH, SOFT, SOFT, HARD, LOW, HIGH…"""
    if states is None:
        cycle = (HostState.HIGH, HostState.SOFT, HostState.SOFT, HostState.HARD, HostState.LOW)
        states = tuple(cycle[i % len(cycle)] for i in range(periods))
    return SimResult(
        scenario="handmade",
        policy="shares",
        seed=7,
        duration_s=periods * period_s,
        period_s=period_s,
        host_memory_bytes=1536 * MIB,
        time_s=period_s * np.arange(1, periods + 1, dtype=np.float64),
        host_free_bytes=np.linspace(0, 500 * MIB, periods).astype(np.int64),
        host_swap_used_bytes=np.zeros(periods, dtype=np.int64),
        host_state=np.array([HOST_STATE_CODES.index(s) for s in states], dtype=np.int64),
        guests=tuple(_guest(n, periods, i) for i, n in enumerate(names)),
    )


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_write_report_writes_every_file_and_returns_their_paths(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "report"
    paths = report.write_report(build_result(), out)
    assert paths == [out / name for name in report.REPORT_FILES]
    assert _entries(out) == sorted(report.REPORT_FILES)
    for png in ("memory.png", "host.png", "throughput.png"):
        assert (out / png).read_bytes().startswith(PNG_MAGIC), png
    # The staging directory was renamed, not copied: nothing else is left next to it.
    assert _entries(out.parent) == ["report"]


def test_summary_json_is_the_summary_object(tmp_path: Path) -> None:
    result = build_result()
    report.write_report(result, tmp_path / "r")
    assert json.loads((tmp_path / "r" / "summary.json").read_text()) == result.summary()


def test_timeseries_csv_has_one_row_per_period_per_guest(tmp_path: Path) -> None:
    result = build_result(periods=6, names=("a", "b", "c"))
    report.write_report(result, tmp_path / "r")
    header, *rows = _rows(tmp_path / "r" / "timeseries.csv")
    assert tuple(header) == report.TIMESERIES_COLUMNS
    assert len(rows) == 6 * 3
    # Period-major order, and the numbers are the arrays' numbers, in bytes.
    row = dict(zip(header, rows[4], strict=True))  # period 2 (index 1), guest "b"
    b = result.guest("b")
    assert float(row["time_s"]) == result.time_s[1]
    assert row["guest"] == "b"
    assert int(row["allocation_bytes"]) == b.allocation_bytes[1]
    assert int(row["balloon_rate_pages"]) == b.balloon_rate_pages[1]
    assert int(row["double_paging"]) == b.double_paging[1]


def test_host_csv_names_the_host_state(tmp_path: Path) -> None:
    states = (HostState.HIGH, HostState.SOFT, HostState.HARD, HostState.LOW)
    result = build_result(periods=4, states=states)
    report.write_report(result, tmp_path / "r")
    header, *rows = _rows(tmp_path / "r" / "host.csv")
    assert tuple(header) == report.HOST_COLUMNS
    assert [r[3] for r in rows] == ["high", "soft", "hard", "low"]
    assert [int(r[1]) for r in rows] == result.host_free_bytes.tolist()


def test_an_existing_empty_directory_is_replaced(tmp_path: Path) -> None:
    out = tmp_path / "r"
    out.mkdir()
    report.write_report(build_result(), out)
    assert _entries(out) == sorted(report.REPORT_FILES)


def test_a_non_empty_directory_is_refused_and_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "r"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        report.write_report(build_result(), out)
    assert _entries(out) == ["notes.txt"]
    assert _entries(tmp_path) == ["r"]


@pytest.mark.parametrize("under_file", [False, True])
def test_a_file_in_the_way_is_refused(tmp_path: Path, under_file: bool) -> None:
    (tmp_path / "f").write_text("")
    target = tmp_path / "f" / "r" if under_file else tmp_path / "f"
    with pytest.raises(ConfigError):
        report.check_report_dir(target)


def test_a_failing_writer_leaves_no_partial_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_plot(result: SimResult, path: Path) -> None:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(report, "plot_host", broken_plot)
    with pytest.raises(OSError, match="No space"):
        report.write_report(build_result(), tmp_path / "r")
    assert _entries(tmp_path) == []


def test_host_state_runs_cover_the_run_in_order() -> None:
    states = (HostState.HIGH, HostState.HIGH, HostState.SOFT, HostState.LOW, HostState.LOW)
    result = build_result(periods=5, states=states, period_s=2.0)
    assert list(report._state_runs(result)) == [
        (HostState.HIGH, 0.0, 4.0),
        (HostState.SOFT, 4.0, 6.0),
        (HostState.LOW, 6.0, 10.0),
    ]


def test_overview_plot_is_written_atomically(tmp_path: Path) -> None:
    path = tmp_path / "demo" / "demo.png"
    report.plot_overview(build_result(), path)
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert _entries(path.parent) == ["demo.png"]


def test_plots_cope_with_more_guests_than_panels(tmp_path: Path) -> None:
    names = tuple(f"g{i}" for i in range(report.MAX_PLOTTED_GUESTS + 2))
    result = build_result(periods=3, names=names)
    report.plot_memory(result, tmp_path / "m.png")
    report.plot_throughput(result, tmp_path / "t.png")
    assert (tmp_path / "m.png").read_bytes().startswith(PNG_MAGIC)


def test_a_single_period_run_plots(tmp_path: Path) -> None:
    report.write_report(build_result(periods=1), tmp_path / "r")
    assert len(_rows(tmp_path / "r" / "host.csv")) == 2
