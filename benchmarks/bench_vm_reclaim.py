"""Reclaim speed on a real guest: take 256 MiB from an idle 512 MiB guest.

Two ways, on the same freshly booted guest kind:
- one plain QMP ``balloon`` command (the guest driver's own speed, the upper limit);
- the daemon's paced steps (the shared AIMD controller, 1 s periods), driven through
  ``GuestPacer`` exactly as the daemon does.
Reports both times and their ratio (issue 3 asks for the figures, no goal).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from _common import write_result
from _vm import boot, state_dir, stop_all
from balloonist.daemon.pacing import AvailableNow, Bounds, GuestPacer
from balloonist.qemu.qmp import BalloonQMP
from balloonist.units import MIB

START = 512 * MIB
GOAL = 256 * MIB
TOLERANCE = 4 * MIB
PERIOD_S = 1.0


async def plain(socket: Path) -> float:
    async with BalloonQMP(socket, name="plain") as qmp:
        start = time.monotonic()
        await qmp.set_target(GOAL)
        await qmp.wait_actual(GOAL, timeout_s=120, tolerance_bytes=TOLERANCE)
        return time.monotonic() - start


async def paced(socket: Path) -> tuple[float, int]:
    async with BalloonQMP(socket, name="paced") as qmp:
        actual = await qmp.actual_bytes()
        pacer = GuestPacer.starting_at(actual, Bounds(0, START))
        start = time.monotonic()
        steps = 0
        while actual > GOAL + TOLERANCE:
            period_start = time.monotonic()
            stats = await qmp.guest_stats()
            available = stats.available_bytes
            now = None if available is None else AvailableNow.exactly(available)
            target = pacer.step(GOAL, actual, now, period_start - start)
            await qmp.set_target(target)
            steps += 1
            await asyncio.sleep(max(0.0, PERIOD_S - (time.monotonic() - period_start)))
            actual = await qmp.actual_bytes()
            if time.monotonic() - start > 300:
                raise TimeoutError("paced reclaim did not finish in 300 s")
        return time.monotonic() - start, steps


def main() -> None:
    state = state_dir()
    try:
        a = boot(state, "plain", 512)
        used_accel = a.accel
        b = boot(state, "paced", 512)
        t_plain = asyncio.run(plain(Path(a.qmp_socket)))

        async def stats_on() -> None:
            async with BalloonQMP(Path(b.qmp_socket), name="paced") as qmp:
                await qmp.enable_stats(1)

        asyncio.run(stats_on())
        time.sleep(2)
        t_paced, steps = asyncio.run(paced(Path(b.qmp_socket)))
    finally:
        stop_all(state)
    print(
        f"take 256 MiB from an idle 512 MiB guest ({used_accel}): plain balloon {t_plain:.2f} s, "
        f"daemon pacing {t_paced:.2f} s in {steps} steps; ratio {t_paced / t_plain:.1f}"
    )
    path = write_result(
        "vm_reclaim",
        {
            "accel": used_accel,
            "reclaim_mib": 256,
            "plain_balloon_s": round(t_plain, 3),
            "paced_s": round(t_paced, 3),
            "paced_steps": steps,
            "paced_over_plain": round(t_paced / t_plain, 2),
        },
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
