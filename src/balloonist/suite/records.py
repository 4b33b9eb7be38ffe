"""What one run of the suite leaves: a compact record per (scenario, policy)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from balloonist.errors import ConfigError

__all__ = ["RunRecord", "join_slices", "record_from_json", "record_to_json"]


@dataclass(frozen=True)
class RunRecord:
    """One policy on one scenario, reduced to the figures the statistics need.

    ``cpu_s`` is how long the run took, not what it computed: it is left out of
    equality, so records compare equal whatever machine or executor produced them.
    """

    scenario: str
    policy: str
    throughput_refs_per_s: float  # all guests together
    guest_names: tuple[str, ...]
    guest_throughput_refs_per_s: tuple[float, ...]  # in guest_names order
    major_faults: int  # served from the guests' own swap
    double_paging_events: int
    host_swap_ins: int
    every_guest_ballooned: bool  # every guest has a balloon driver
    cpu_s: float = field(default=0.0, compare=False)

    def guest_throughput(self) -> dict[str, float]:
        return dict(zip(self.guest_names, self.guest_throughput_refs_per_s, strict=True))


def record_to_json(record: RunRecord) -> dict[str, Any]:
    data = asdict(record)
    data["guest_throughput_refs_per_s"] = record.guest_throughput()
    del data["guest_names"]
    return data


def record_from_json(data: dict[str, Any]) -> RunRecord:
    guests: dict[str, float] = data["guest_throughput_refs_per_s"]
    return RunRecord(
        scenario=data["scenario"],
        policy=data["policy"],
        throughput_refs_per_s=float(data["throughput_refs_per_s"]),
        guest_names=tuple(guests),
        guest_throughput_refs_per_s=tuple(float(v) for v in guests.values()),
        major_faults=int(data["major_faults"]),
        double_paging_events=int(data["double_paging_events"]),
        host_swap_ins=int(data["host_swap_ins"]),
        every_guest_ballooned=bool(data["every_guest_ballooned"]),
        cpu_s=float(data["cpu_s"]),
    )


def join_slices(
    slices: Sequence[tuple[str, Sequence[RunRecord]]], policies: Sequence[str]
) -> list[RunRecord]:
    """One suite's records from the slices it was run in, each named (a file, say).

    A run is the same whatever ran it, so slices join into one suite, if together they
    hold each (scenario, policy) of ``policies`` exactly once and every policy for
    every scenario they hold. ConfigError, naming the slice, otherwise.
    """
    seen: dict[tuple[str, str], str] = {}
    joined: list[RunRecord] = []
    for name, records in slices:
        for r in records:
            if r.policy not in policies:
                raise ConfigError(
                    f"{r.scenario} ran policy {r.policy!r}, not one of the suite's", where=name
                )
            if (r.scenario, r.policy) in seen:
                raise ConfigError(
                    f"{r.scenario} under {r.policy} is in {seen[r.scenario, r.policy]} too",
                    where=name,
                )
            seen[r.scenario, r.policy] = name
        joined += records
    have: dict[str, set[str]] = {}
    for r in joined:
        have.setdefault(r.scenario, set()).add(r.policy)
    for scenario, ran in have.items():
        if missing := [p for p in policies if p not in ran]:
            raise ConfigError(f"{scenario} has no record of {', '.join(missing)}", where="suite")
    return joined
