"""The demo's comparison as printed: the table fits, the verdict follows the figures."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from rich.console import Console

from balloonist.compareview import CompareBars, CompareLines, compare_table, verdict
from balloonist.sim.compare import PolicyProgress


def _summary(policy: str, refs_per_s: float, faults: int, guests: int = 3) -> dict[str, Any]:
    names = ["busy", "idle", "phased", "a-guest-with-a-long-name", "e", "f"][:guests]
    return {
        "scenario": "demo",
        "policy": policy,
        "seed": 1,
        "duration_s": 120.0,
        "aggregate": {
            "throughput_refs_per_s": refs_per_s,
            "guest_major_faults": faults,
            "host_swap_ins": 0,
            "host_swap_outs": 0,
            "double_paging_events": faults // 10,
        },
        "guests": {
            name: {"throughput_refs_per_s": refs_per_s / guests, "major_faults": faults}
            for name in names
        },
    }


def _render(renderable: Any, width: int = 300) -> list[str]:
    stream = io.StringIO()
    Console(file=stream, width=width, color_system=None).print(renderable)
    return stream.getvalue().splitlines()


def test_table_rows_in_order_with_the_baseline_first_and_marked() -> None:
    summaries = {
        "mom": _summary("mom", 1.5e6, 300_000),
        "shares": _summary("shares", 1.2e6, 800_000),
        "static": _summary("static", 1.0e6, 1_000_000),
    }
    lines = _render(compare_table(summaries, baseline="shares", baseline_note="default"))
    rows = [line for line in lines if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == ["shares (default)", "mom", "static"]
    assert "1.25x" in rows[1]  # mom against shares
    assert "0.83x" in rows[2]
    assert "800k" in rows[0]


@pytest.mark.parametrize("guests", [3, 6])
def test_table_fits_in_100_columns_even_with_long_names_and_large_figures(guests: int) -> None:
    summaries = {
        name: _summary(name, 987e9, 99_999_999, guests)
        for name in ("host-swap", "shares", "proxmox", "static", "mom", "oracle")
    }
    table = compare_table(summaries, baseline="host-swap", baseline_note="--policy")
    lines = _render(table)  # a wide console: the table takes its natural width
    assert max(len(line.rstrip()) for line in lines) <= 100
    assert ("not shown" in lines[0]) == (guests > 4)


def test_verdict_names_the_runner_up_when_the_baseline_wins() -> None:
    summaries = {
        "shares": _summary("shares", 2.0e6, 100),
        "mom": _summary("mom", 1.6e6, 5_000),
        "static": _summary("static", 1.0e6, 9_000),
    }
    text = verdict(summaries, baseline="shares", baseline_note="default")
    assert text == (
        "shares (default) won: 1.25x the throughput of mom, with 100 guest major faults to its 5k."
    )


def test_verdict_names_the_baseline_when_a_peer_wins() -> None:
    summaries = {
        "shares": _summary("shares", 1.2e6, 800_000),
        "static": _summary("static", 1.0e6, 1_000_000),
        "mom": _summary("mom", 1.5e6, 300_000),
    }
    text = verdict(summaries, baseline="shares", baseline_note="default")
    assert text.startswith("mom won: 1.25x the throughput of shares (default), with 300k")


def test_verdict_ties_and_a_lone_policy() -> None:
    summaries = {name: _summary(name, 1e6, 0) for name in ("shares", "mom", "static")}
    summaries["static"] = _summary("static", 0.5e6, 0)
    assert verdict(summaries, baseline="shares", baseline_note="default").startswith(
        "shares and mom tied"
    )
    alone = verdict({"shares": summaries["shares"]}, baseline="shares", baseline_note="default")
    assert "nothing to compare" in alone


def test_compare_lines_print_each_tenth_of_all_runs_once() -> None:
    stream = io.StringIO()
    lines = CompareLines(stream, ["mom", "static"], periods=10)
    for period in range(1, 11):
        for name in ("mom", "static"):
            lines(PolicyProgress(name, period, 10))
    printed = stream.getvalue().splitlines()
    assert len(printed) == 10
    assert printed[-1] == "[100%] comparing: mom 10/10, static 10/10"
    assert [int(m) for m in re.findall(r"\[ *(\d+)%\]", stream.getvalue())] == list(
        range(10, 101, 10)
    )


def test_compare_bars_draw_every_policy() -> None:
    stream = io.StringIO()
    console = Console(file=stream, width=100, force_terminal=True)
    with CompareBars(console, ["mom", "static"], periods=4) as bars:
        bars(PolicyProgress("mom", 4, 4))
        bars(PolicyProgress("static", 1, 4))
    out = stream.getvalue()
    assert "mom" in out
    assert "4/4" in out
    assert "1/4" in out
