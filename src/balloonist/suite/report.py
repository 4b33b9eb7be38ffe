"""The suite's report directory, written all or nothing.

``records.json`` (every run), ``summary.json`` (the statistics), ``scenarios/*.toml``
(each generated scenario, to rerun with ``balloonist simulate``) and ``suite.png``
(relative throughput per policy). Everything goes into a hidden directory beside the
target, renamed into place at the end (``balloonist.report.staged_report_dir``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import tomli_w
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from balloonist.report import staged_report_dir
from balloonist.suite.records import RunRecord, record_to_json
from balloonist.suite.stats import BOUNDS, PolicyStats, ratios, summary_json

__all__ = ["SUITE_FILES", "plot_suite", "write_results", "write_suite_report"]

SUITE_FILES: Final = ("records.json", "summary.json", "scenarios", "suite.png")


def write_suite_report(
    directory: Path,
    scenarios: Sequence[dict[str, Any]],
    records: Sequence[RunRecord],
    stats: Sequence[PolicyStats],
    meta: dict[str, Any],
) -> None:
    """Write every file of :data:`SUITE_FILES` into ``directory`` (new or empty)."""
    with staged_report_dir(directory) as staging:
        write_results(staging, records, stats, meta)
        (staging / "scenarios").mkdir()
        for data in scenarios:
            (staging / "scenarios" / f"{data['name']}.toml").write_bytes(
                tomli_w.dumps(data).encode()
            )
        plot_suite(records, staging / "suite.png", title=str(meta.get("title", "suite")))


def write_results(
    directory: Path,
    records: Sequence[RunRecord],
    stats: Sequence[PolicyStats],
    meta: dict[str, Any],
) -> None:
    """``records.json`` (every run) and ``summary.json`` (the statistics), each
    starting with ``meta``: the two files the report and the suite's page share."""
    _write_json(
        directory / "records.json", {**meta, "records": [record_to_json(r) for r in records]}
    )
    _write_json(directory / "summary.json", {**meta, **summary_json(stats)})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def plot_suite(records: Sequence[RunRecord], path: Path, *, title: str) -> None:
    """ECDF of throughput / bound per policy: the further right, the better."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bound = next((b for b in BOUNDS if any(r.policy == b for r in records)), None)
    if bound is None:
        ax.text(0.5, 0.5, "no bound was run", ha="center", transform=ax.transAxes)
    else:
        for policy, values in ratios(records, bound).items():
            x = np.sort(np.array(values))
            y = np.arange(1, len(x) + 1) / len(x)
            ax.step(x, y, where="post", label=policy)
        ax.set_xlabel(f"aggregate throughput / {bound}")
        ax.set_ylabel("fraction of scenarios at or below")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    ax.set_title(title)
    fig.savefig(path, dpi=100)
