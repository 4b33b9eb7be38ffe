"""What one run of the suite leaves: a compact record per (scenario, policy)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["RunRecord", "record_from_json", "record_to_json"]


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
