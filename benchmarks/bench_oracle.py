"""How long the oracle takes to decide for 16 guests on a 48 GiB host.

Run: ``python benchmarks/bench_oracle.py``. The goal is well under a second of CPU per
uncached decision (new workloads or active sizes: the grid search and the top-up),
with the guests' miss-ratio curves already measured -- they are measured once per
workload and active size, and that is timed separately. Prints CPU seconds
(``time.process_time``): other work shares the machine.
"""

from __future__ import annotations

import statistics
import time
from typing import Final

from balloonist.model import GuestSample, GuestSpec, GuestView, HostSample, HostState, Snapshot
from balloonist.sim.curves import CurveBook
from balloonist.sim.oracle import OraclePolicy
from balloonist.sim.scenario import Costs, Replacement, SimGuest
from balloonist.sim.valuation import ModeValues
from balloonist.sim.workload import Workload, WorkloadKind, WorkloadPlan
from balloonist.units import GIB, MIB, PAGE_SIZE_BYTES

GUESTS: Final = 16
HOST_BYTES: Final = 48 * GIB
RUNS: Final = 5
COSTS: Final = Costs(1e-6, 2e-6, 100e-6, 20e-6, 2e-6, 110e-6, 20e-6, 0.5e-6)
KINDS: Final = (WorkloadKind.ZIPF, WorkloadKind.UNIFORM, WorkloadKind.SCAN, WorkloadKind.ZIPF)


def guests() -> list[SimGuest]:
    out = []
    for i in range(GUESTS):
        memory = 8 * GIB
        workload = Workload(KINDS[i % 4], (1 + i % 5) * GIB // PAGE_SIZE_BYTES, skew=0.9)
        out.append(
            SimGuest(
                spec=GuestSpec(
                    f"vm{i:02d}", memory, min_bytes=256 * MIB, shares=1000 * (1 + i % 4)
                ),
                replacement=list(Replacement)[i % 3],
                kernel_pages=64 * MIB // PAGE_SIZE_BYTES,
                swap_pages=2 * memory // PAGE_SIZE_BYTES,
                plan=WorkloadPlan.single(workload),
            )
        )
    return out


def main() -> None:
    gs = guests()
    views = tuple(GuestView(g.spec, GuestSample(g.name, 0, 0, 0), working_set_bytes=0) for g in gs)
    snapshot = Snapshot(0.0, 1.0, HostSample(0.0, HOST_BYTES, 0, 0, 0, HostState.HIGH), views)
    book = CurveBook()
    start = time.process_time()
    OraclePolicy(gs, COSTS, modes=ModeValues(COSTS, book)).decide(snapshot)
    print(f"first decision, curves measured: {time.process_time() - start:.2f} s CPU")
    for fair in (False, True):
        times = []
        for _ in range(RUNS):  # fresh oracles: no decision cached, curves shared
            oracle = OraclePolicy(
                gs, COSTS, modes=ModeValues(COSTS, book), slices_per_period=4, fair=fair
            )
            start = time.process_time()
            oracle.decide(snapshot)
            times.append(time.process_time() - start)
        name = "oracle-fair" if fair else "oracle"
        print(f"{name}: median {statistics.median(times):.3f} s CPU per uncached decision")


if __name__ == "__main__":
    main()
