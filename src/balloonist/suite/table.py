"""The suite's table: one row per policy, the columns docs/suite.md explains."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from balloonist.suite.stats import PolicyStats

__all__ = ["suite_table"]


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def suite_table(stats: Sequence[PolicyStats], *, title: str) -> Table:
    bounds = [r.bound for r in stats[0].relative] if stats else []
    table = Table(title=title, title_justify="left")
    table.add_column("policy", style="bold")
    for bound in bounds:
        for what in ("median", "p10", "worst"):
            table.add_column(f"{what}\n/{bound}", justify="right")
    table.add_column("worst\nscenario")
    table.add_column("sharing\nok", justify="right")
    table.add_column("double paging\nscen. / events", justify="right")
    table.add_column("ballooned only\nscen. / events", justify="right")
    peers = [s.policy for s in stats]
    for peer in peers:
        table.add_column(f">= {peer}", justify="right")
    for s in stats:
        row = [s.policy]
        for rel in s.relative:
            row += [f"{rel.median:.3f}", f"{rel.p10:.3f}", f"{rel.worst:.3f}"]
        row.append(s.relative[0].worst_scenario if s.relative else "-")
        row.append(
            "-"
            if s.sharing_pass is None or not s.sharing_scenarios
            else f"{s.sharing_pass}/{s.sharing_scenarios}"
        )
        for dp in (s.double_paging, s.double_paging_ballooned):
            row.append(f"{dp.scenarios_with_any}/{dp.scenarios} / {dp.events}")
        versus = {v.peer: v.at_least_as_good for v in s.versus}
        row += ["" if peer == s.policy else _fraction(versus.get(peer)) for peer in peers]
        table.add_row(*row)
    return table
