"""Peak memory of a 1,000-guest x 64 MiB simulation, against its page-state arrays.

Issue 2 asks for the figure and expects a small multiple of the page-state arrays
(no Python object per page). The simulation runs in this process; peak RSS comes
from getrusage, the array bytes from the arrays themselves, and the baseline is the
RSS after imports and compilation, before the machine is built.
"""

from __future__ import annotations

import resource
import time

from _common import write_result
from balloonist.sim.guest_memory import GuestMemory
from balloonist.sim.runner import run_scenario
from balloonist.sim.scenario import Scenario, scenario_from_dict

GUESTS = 1000


def scenario(guests: int, duration_s: float) -> Scenario:
    kinds = ["uniform", "zipf", "scan", "idle"]
    data = {
        "host": {"memory": f"{guests * 48}MiB", "swap": f"{guests * 32}MiB"},
        "sim": {"duration_s": duration_s, "seed": 1, "slices_per_period": 1},
        # few references per simulated second: this measures memory, not speed
        "costs": {"reference_s": 1e-3},
        "guests": [
            {
                "name": f"g{i}",
                "memory": "64MiB",
                "kernel": "8MiB",
                "workload": {"kind": kinds[i % 4], "working_set": "48MiB"},
            }
            for i in range(guests)
        ],
    }
    return scenario_from_dict(data, where="bench_memory", default_name="bench-memory")


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def array_bytes(m: GuestMemory) -> int:
    arrays = (m.v2p, m.vswap, m.p2v, m.pstate, m.stamp, m.oldest, m.refbit, m.sampled, m.free)
    return sum(a.nbytes for a in arrays)


def main() -> None:
    run_scenario(scenario(2, 2.0))  # imports and compilation, outside the measurement
    baseline = rss_mib()
    sc = scenario(GUESTS, 5.0)
    start = time.perf_counter()
    run_scenario(sc)
    elapsed = time.perf_counter() - start
    peak = rss_mib()
    from balloonist.sim.machine import SimMachine

    arrays_mib = sum(array_bytes(m) for m in SimMachine(sc).guests) / 2**20
    growth = peak - baseline
    print(
        f"{GUESTS} guests x 64 MiB: peak RSS {peak:.0f} MiB "
        f"({growth:.0f} MiB above the {baseline:.0f} MiB baseline); "
        f"page-state arrays {arrays_mib:.0f} MiB; ratio {growth / arrays_mib:.2f}; "
        f"{sc.periods} periods in {elapsed:.1f} s"
    )
    path = write_result(
        "sim_peak_memory",
        {
            "guests": GUESTS,
            "guest_memory_mib": 64,
            "periods": sc.periods,
            "wall_s": round(elapsed, 2),
            "baseline_rss_mib": round(baseline, 1),
            "peak_rss_mib": round(peak, 1),
            "page_state_arrays_mib": round(arrays_mib, 1),
            "growth_over_arrays": round(growth / arrays_mib, 2),
        },
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
