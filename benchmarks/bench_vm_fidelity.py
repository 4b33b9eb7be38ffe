"""Balloon fidelity on real guests (the ESX dbench experiment, on QEMU).

The same touchmem workload (150 MiB working set, which fits the 256 MiB guest) runs in
a guest configured with
512 MiB and ballooned to 256 MiB, and in a guest configured with 256 MiB. Throughput
is the guest's own count of pages written per second, averaged over MEASURE_S seconds
once both have run WARMUP_S seconds. Goal (issue 3): ratio >= 0.95.

Under TCG one guest's speed varies from boot to boot by more than any balloon effect
(a run here gave pairs of 1.27, 0.53 and 1.01), so the figure is the ratio of the
medians over REPEATS alternating pairs, which one disturbed boot cannot move much; the
per-pair ratios are recorded beside it so the spread is visible.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

from _common import write_result
from _vm import boot, state_dir, stop_all, work_rates
from balloonist.qemu.qmp import BalloonQMP
from balloonist.units import MIB

WARMUP_S = 10.0
MEASURE_S = 30.0
WORKLOAD_MIB = 150
REPEATS = 5


def measure(name: str, memory_mib: int, balloon_to_mib: int | None) -> tuple[float, str]:
    """Boot one guest, balloon it if asked, and average its throughput; then stop it.

    One guest at a time: two TCG guests on two cores disturb each other far more than
    ballooning could.
    """
    state = state_dir()
    # The workload starts 15 s after boot, so the balloon is in place before it runs,
    # as in the ESX experiment.
    work = f"0@0,{WORKLOAD_MIB}@15"
    try:
        record = boot(state, name, memory_mib, work=work)
        if balloon_to_mib is not None:

            async def shrink() -> None:
                async with BalloonQMP(Path(record.qmp_socket), name=name) as qmp:
                    await qmp.set_target(balloon_to_mib * MIB)
                    await qmp.wait_actual(balloon_to_mib * MIB, timeout_s=60)

            asyncio.run(shrink())
        time.sleep(15 + WARMUP_S)
        first = len(work_rates(record))
        time.sleep(MEASURE_S)
        got = work_rates(record)[first:]
        if not got:
            raise RuntimeError(f"{name}: the workload stopped reporting (OOM-killed?)")
        return statistics.mean(got), str(record.accel)
    finally:
        stop_all(state)


def main() -> None:
    ballooned: list[float] = []
    native: list[float] = []
    used_accel = ""
    for _ in range(REPEATS):  # alternating, so drift in the host hits both alike
        b, used_accel = measure("ballooned", 512, 256)
        ballooned.append(b)
        native.append(measure("native", 256, None)[0])
    ratios = [b / n for b, n in zip(ballooned, native, strict=True)]
    ratio = statistics.median(ballooned) / statistics.median(native)
    print(
        f"ballooned 512->256 MiB: median {statistics.median(ballooned):,.0f} pages/s; native "
        f"256 MiB: median {statistics.median(native):,.0f} pages/s; ratio of medians "
        f"{ratio:.3f}, per pair "
        f"{', '.join(f'{r:.2f}' for r in ratios)} (goal >= 0.95, accel {used_accel})"
    )
    path = write_result(
        "vm_fidelity",
        {
            "accel": used_accel,
            "workload_mib": WORKLOAD_MIB,
            "measure_s": MEASURE_S,
            "repeats": REPEATS,
            "ballooned_pages_per_s": [round(b) for b in ballooned],
            "native_pages_per_s": [round(n) for n in native],
            "ratio_per_pair": [round(r, 3) for r in ratios],
            "ratio_of_medians": round(ratio, 4),
            "goal_ratio": 0.95,
            "goal_met": ratio >= 0.95,
        },
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
