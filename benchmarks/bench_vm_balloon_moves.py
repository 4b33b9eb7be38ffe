"""What moving a balloon costs a real guest's workload, when the memory it moves is
memory the workload does not use.

One 512 MiB test guest runs touchmem over a 200 MiB working set, ballooned to
360 MiB: the set and the kernel fit with room to spare, so no size in the run takes
a page the workload touches. In one boot the balloon is held still and moved in
turns (``PHASE_S`` each, still first, ``TURNS`` of each), and each move phase moves
it every second by ``step`` MiB up and down around 360 MiB. The figure is the mean
pages written per second in the move phases over that in the still phases, for each
step size, each in its own boot.

Why: in a quick two-round run of ``bench_vm_policies.py`` (12-06) the steady guest,
whose working set every policy leaves alone, did about a third less work per
processor second under ``demand`` than under ``static``, in both rounds; in the full
run after it, it did not (``static``'s steady guest was the slowest). Within one boot
the comparison is free of the boot-to-boot drift of TCG guests (``bench_vm_fidelity``
saw 0.53x-1.27x between boots); across boots the absolute rates are not comparable,
only each boot's ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from statistics import fmean
from typing import Final

from _common import write_result
from _vm import boot, state_dir, stop_all, work_reports
from balloonist.qemu import launcher
from balloonist.qemu.qmp import BalloonQMP
from balloonist.units import MIB

GUEST_MIB: Final = 512
WORKING_SET_MIB: Final = 200
CENTRE_MIB: Final = 360
STEPS_MIB: Final = (8, 64)
PHASE_S: Final = 25.0
TURNS: Final = 3
#: The first seconds of a phase are the last one's tail: left out.
SETTLE_S: Final = 3


def _reports(record: launcher.VMRecord) -> list[tuple[int, int]]:
    """(t_s, pages_per_s) of every BALLOONIST-WORK line so far."""
    return [(t, rate) for t, _, rate in work_reports(record)]


async def _phases(
    record: launcher.VMRecord, step_mib: int, phase_s: float
) -> dict[str, list[float]]:
    """Each phase's mean rate, by kind, in the order they ran."""
    rates: dict[str, list[float]] = {"still": [], "move": []}
    async with BalloonQMP(Path(record.qmp_socket), name=record.name) as qmp:
        await qmp.set_target(CENTRE_MIB * MIB)
        await qmp.wait_actual(CENTRE_MIB * MIB, timeout_s=60)
        for kind in ("still", "move") * TURNS:
            begun_t = _reports(record)[-1][0]
            end = time.monotonic() + phase_s
            up = True
            while time.monotonic() < end:
                if kind == "move":
                    await qmp.set_target((CENTRE_MIB + (step_mib if up else -step_mib)) * MIB)
                    up = not up
                await asyncio.sleep(1.0)
            await qmp.set_target(CENTRE_MIB * MIB)
            ended_t = _reports(record)[-1][0]
            got = [p for t, p in _reports(record) if begun_t + SETTLE_S <= t <= ended_t]
            if not got:
                raise RuntimeError(f"{record.name}: touchmem stopped reporting")
            rates[kind].append(fmean(got))
            print(f"  step {step_mib} MiB, {kind}: {rates[kind][-1]:,.0f} pages/s", flush=True)
    return rates


def measure(step_mib: int, phase_s: float) -> tuple[dict[str, list[float]], str]:
    state = state_dir()
    try:
        record = boot(state, f"moves{step_mib}", GUEST_MIB, work=f"{WORKING_SET_MIB}@0")
        return asyncio.run(_phases(record, step_mib, phase_s)), str(record.accel)
    finally:
        stop_all(state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 s phases")
    args = parser.parse_args()
    phase_s = 10.0 if args.quick else PHASE_S
    figures: dict[str, object] = {}
    accel = ""
    for step in STEPS_MIB:
        rates, accel = measure(step, phase_s)
        ratio = fmean(rates["move"]) / fmean(rates["still"])
        print(f"step ±{step} MiB a second: move / still {ratio:.3f}")
        figures[f"step_{step}_mib"] = {
            "still_pages_per_s": [round(r) for r in rates["still"]],
            "move_pages_per_s": [round(r) for r in rates["move"]],
            "move_over_still": round(ratio, 4),
        }
    path = write_result(
        "vm_balloon_moves_quick" if args.quick else "vm_balloon_moves",
        {
            "accel": accel,
            "guest_mib": GUEST_MIB,
            "working_set_mib": WORKING_SET_MIB,
            "centre_mib": CENTRE_MIB,
            "phase_s": phase_s,
            "turns": TURNS,
            **figures,
        },
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
