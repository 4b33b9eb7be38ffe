"""The suite's page (``docs/experiments/suite/``): every figure from one run's records.

``benchmarks/bench_suite.py`` runs the default suite and writes the page with
:func:`write_suite_page`: ``suite.md`` (the tables below), ``records.json`` (every
run, so ``tests/suite/test_slice.py`` can check that the code still gives them),
``summary.json`` and ``suite.png``. Nothing on the page is typed in by hand.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from balloonist.report import staged_report_dir
from balloonist.suite.generator import GeneratorParams
from balloonist.suite.goals import BeatenBound, Goal
from balloonist.suite.records import RunRecord
from balloonist.suite.report import plot_suite, write_results
from balloonist.suite.stats import PolicyStats

__all__ = ["PAGE_FILES", "suite_markdown", "write_suite_page"]

PAGE_FILES = ("suite.md", "records.json", "summary.json", "suite.png")


def write_suite_page(
    directory: Path,
    records: Sequence[RunRecord],
    stats: Sequence[PolicyStats],
    goals: Sequence[Goal],
    beaten: Sequence[BeatenBound],
    meta: dict[str, Any],
) -> None:
    """Write :data:`PAGE_FILES` into ``directory``, replacing what was there, all or
    nothing. ``meta`` holds seed, count, default_policy, params (a
    ``GeneratorParams``), wall_s, cpu_s, jobs and, for a suite run in slices, each
    slice's times (``slices``)."""
    params: GeneratorParams = meta["params"]
    plain = {k: v for k, v in meta.items() if k != "params"}
    fresh = directory.parent / f".{directory.name}.new"
    shutil.rmtree(fresh, ignore_errors=True)  # left by a run that was killed
    with staged_report_dir(fresh) as staging:
        write_results(staging, records, stats, plain)
        title = f"suite: {meta['count']} scenarios, seed {meta['seed']}"
        plot_suite(records, staging / "suite.png", title=title)
        text = suite_markdown(stats, goals, beaten, params, plain)
        (staging / "suite.md").write_text(text, encoding="utf-8")
    # The old page goes only once the new one is complete.
    old = directory.parent / f".{directory.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(fresh, directory)
    shutil.rmtree(old, ignore_errors=True)


def _times(meta: dict[str, Any]) -> str:
    """What the suite cost: how many runs it was put together from, when more than
    one (each slice's times are in ``records.json``), its wall time where every
    slice has one, and its CPU time."""
    slices = len(meta.get("slices", ()))
    joined = f"{slices} slices, their times summed, " if slices > 1 else ""
    wall_s = meta["wall_s"]
    wall = (
        "no wall time (a slice was taken out of a longer run)"
        if wall_s is None
        else f"{wall_s / 60:.1f} min wall"
    )
    return f"{joined}{wall}, {meta['cpu_s'] / 60:.0f} CPU min"


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def suite_markdown(
    stats: Sequence[PolicyStats],
    goals: Sequence[Goal],
    beaten: Sequence[BeatenBound],
    params: GeneratorParams,
    meta: dict[str, Any],
) -> str:
    default = meta["default_policy"]
    fair = any(r.bound == "oracle-fair" for s in stats for r in s.relative)
    lines = [
        f"# The policy suite: {meta['count']} generated hosts, seed {meta['seed']}",
        "",
        "Every policy below on every host of the suite, run side by side "
        f"(`python benchmarks/bench_suite.py`; {meta['jobs']} processes, {_times(meta)}). "
        "Throughput is the aggregate references per second of all guests, relative to "
        "the `oracle` bound ([oracle.md](../../oracle.md))"
        + (" and to `oracle-fair`, the bound under the sharing rule" if fair else "")
        + ". How the suite works: [suite.md](../../suite.md).",
        "",
        "![throughput relative to the oracle, per policy](suite.png)",
        "",
        f"## The default policy (`{default}`) against its goals",
        "",
        "| goal | measured | needed | |",
        "|---|---|---|---|",
        *(
            f"| {g.name} | {g.measured:.3f} | {g.goal:g} | {'met' if g.holds else '**missed**'} |"
            for g in goals
        ),
        "",
        "## Every policy",
        "",
        _policy_table(stats, default),
        "",
        "*at least as good*: on how many scenarios the policy's throughput is at least "
        "0.99x the default's; *sharing*: scenarios where no guest fell below 0.9x its "
        "throughput under `static`; *double paging*: scenarios with any, of those where "
        "every guest has a balloon driver.",
        "",
        "## The bound",
        "",
    ]
    if beaten:
        lines += [
            f"A policy beat `oracle` by more than 1 % on {len(beaten)} "
            f"run{'' if len(beaten) == 1 else 's'}: the bound is not "
            "yet a bound there.",
            "",
            "| scenario | policy | throughput / oracle |",
            "|---|---|---|",
            *(f"| {b.scenario} | {b.policy} | {b.ratio:.3f} |" for b in beaten),
        ]
    else:
        lines.append("No policy beat `oracle` by more than 1 % on any scenario.")
    lines += [
        "",
        "## The generator's parameters",
        "",
        "`balloonist.suite.generator.GeneratorParams`, the defaults (each explained in the code):",
        "",
        "| parameter | value |",
        "|---|---|",
        *(f"| `{f.name}` | {getattr(params, f.name)} |" for f in fields(params)),
        "",
    ]
    return "\n".join(lines)


def _policy_table(stats: Sequence[PolicyStats], default: str) -> str:
    rows = [
        "| policy | median / oracle | p10 | worst (scenario) | median / oracle-fair "
        f"| at least as good as `{default}` | sharing | double paging |",
        "|---|---|---|---|---|---|---|---|",
    ]
    mine = next(s for s in stats if s.policy == default)
    against_default = {v.peer: v for v in mine.versus}
    for s in stats:
        rel = {r.bound: r for r in s.relative}
        oracle, fair = rel.get("oracle"), rel.get("oracle-fair")
        if s.policy == default:
            versus = "-"
        else:
            # how often the peer is at least as good as the default: the default's
            # losses and ties against it
            v = against_default[s.policy]
            versus = f"{v.ties + v.losses}/{v.wins + v.ties + v.losses}"
        sharing = "-" if s.sharing_pass is None else f"{s.sharing_pass}/{s.sharing_scenarios}"
        dp = s.double_paging_ballooned
        rows.append(
            f"| {s.policy} | {_fraction(oracle.median if oracle else None)} "
            f"| {_fraction(oracle.p10 if oracle else None)} "
            f"| {_fraction(oracle.worst if oracle else None)}"
            f"{f' ({oracle.worst_scenario})' if oracle else ''} "
            f"| {_fraction(fair.median if fair else None)} | {versus} | {sharing} "
            f"| {dp.scenarios_with_any}/{dp.scenarios} |"
        )
    return "\n".join(rows)
