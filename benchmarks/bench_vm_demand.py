"""Demand tracking on real guests: how fast the daemon's policy follows a working set
that steps from 100 to 300 MiB and back, with the agent's signals vs. virtio-balloon
statistics alone.

Two 512 MiB guests share a 640 MiB budget under the shares policy: "busy" (an agent
VM running the agent .pyz over a 9p root, and touchmem with the stepping working set)
and "idle" (virtio-balloon, 20 MiB in use). The same set-up runs twice: once with
the daemon managing busy through its agent (stats: MemAvailable, refaults, swap,
PSI), once through virtio-balloon (stats: available, major faults, swap-ins).

The figure is each step's follow time: seconds from the step (the first serial line
where touchmem reports the new working set) until the policy's working-set estimate
for busy has covered 90 % of the change it settles at (its value at the end of the
window). Busy's allocation is recorded too; it rises with the estimate, but after the
step down nothing takes it back while the host has memory to spare (the HIGH state
reclaims nothing), so only its rise is a tracking figure. Sampled once a daemon
period (1 s).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from _common import write_result
from _vm import ACCEL, assets, lines, state_dir, stop_all, wait_line
from balloonist.agent.pyz import build_pyz
from balloonist.daemon.service import Daemon, DaemonConfig
from balloonist.daemon.vm_ports import VmPort
from balloonist.qemu import launcher
from balloonist.qemu.assets import default_cache_dir, host_python
from balloonist.qemu.qmp import BalloonQMP
from balloonist.units import MIB

MEMORY_MIB = 512
BUDGET = "640MiB"
#: touchmem's schedule, seconds after the guest booted: up at 70 s, down at 160 s.
WORK = "100@0,300@70,100@160"
UP_WINDOW_S = 90.0
DOWN_WINDOW_S = 120.0
FRACTION = 0.9


def _step_seen(record: launcher.VMRecord, ws_mib: int, after: int) -> int | None:
    for i, line in enumerate(lines(record)[after:], after):
        if re.search(rf"BALLOONIST-WORK .*ws_mib={ws_mib} ", line):
            return i
    return None


def _run(mode: str) -> dict[str, object]:
    # where a host-root guest sees it: not under /tmp, which the guest mounts its own
    pyz = build_pyz(default_cache_dir().parent / "guest-shared" / "balloonist-agent.pyz")
    state = state_dir()
    guest = assets()
    try:
        busy = launcher.start_vm(
            state,
            guest.start_request(
                "busy",
                MEMORY_MIB * MIB,
                accel=ACCEL,
                work=WORK,
                agent=True,
                min_bytes=128 * MIB,
                run=(host_python(), str(pyz)),
            ),
        )
        idle = launcher.start_vm(
            state,
            guest.start_request(
                "idle", MEMORY_MIB * MIB, accel=ACCEL, work="20@0", min_bytes=128 * MIB
            ),
        )
        for record in (busy, idle):
            wait_line(record, "BALLOONIST-READY", 120.0)

        def virtio_only(record: launcher.VMRecord) -> VmPort:
            return BalloonQMP(Path(record.qmp_socket), name=record.name)

        connector: Callable[[launcher.VMRecord], VmPort] | None = (
            None if mode == "agent" else virtio_only
        )
        config = DaemonConfig.model_validate({"daemon": {"budget": BUDGET}})
        daemon = Daemon(config, state, connector=connector)
        # (time, busy's working-set estimate, busy's allocation), once a period
        trace: list[tuple[float, int, int]] = []

        def step() -> None:
            started = time.monotonic()
            cycle = daemon.step()
            if cycle is not None:
                view = next((v for v in cycle.snapshot.guests if v.spec.name == "busy"), None)
                if view is not None:
                    trace.append(
                        (time.monotonic(), view.working_set_bytes, view.sample.allocated_bytes)
                    )
            daemon.idle(max(0.0, 1.0 - (time.monotonic() - started)))

        def run_until_step(ws_mib: int) -> float:
            mark = len(lines(busy))
            while _step_seen(busy, ws_mib, mark) is None:
                step()
            return time.monotonic()

        try:
            up_at = run_until_step(300)
            ws_before, alloc_before = trace[-2][1], trace[-2][2]
            while time.monotonic() < up_at + UP_WINDOW_S:
                step()
            down_at = run_until_step(100)
            ws_up, alloc_up = trace[-2][1], trace[-2][2]
            while time.monotonic() < down_at + DOWN_WINDOW_S:
                step()
            ws_down, alloc_down = trace[-1][1], trace[-1][2]
            seen = daemon.hv.view("busy")
            port = type(seen.port if seen is not None else None).__name__
        finally:
            daemon.close()

        def follow_s(start: float, column: int, lo: int, hi: int) -> float:
            goal = lo + FRACTION * (hi - lo)
            for row in trace:
                if row[0] >= start and (row[column] >= goal if hi > lo else row[column] <= goal):
                    return row[0] - start
            return float("nan")

        result = {
            "estimate_up_s": follow_s(up_at, 1, ws_before, ws_up),
            "estimate_down_s": follow_s(down_at, 1, ws_up, ws_down),
            "allocation_up_s": follow_s(up_at, 2, alloc_before, alloc_up),
            "estimate_mib": [ws_before / MIB, ws_up / MIB, ws_down / MIB],
            "allocation_mib": [alloc_before / MIB, alloc_up / MIB, alloc_down / MIB],
        }
        print(f"{mode} (busy through {port}): {result}", flush=True)
        return result
    finally:
        stop_all(state)


def main() -> None:
    results = {mode: _run(mode) for mode in ("agent", "virtio")}
    for mode, r in results.items():
        print(
            f"{mode:>6}: estimate follows up in {r['estimate_up_s']:.0f} s, down in "
            f"{r['estimate_down_s']:.0f} s; allocation up in {r['allocation_up_s']:.0f} s "
            f"(estimate MiB {_mib(r['estimate_mib'])}, allocation MiB {_mib(r['allocation_mib'])})"
        )
    accel = launcher.resolve_accel(ACCEL, launcher.qemu_binary())
    path = write_result(
        "vm_demand",
        {
            "accel": accel,
            "work": WORK,
            "budget": BUDGET,
            "fraction": FRACTION,
            "modes": {m: {k: _rounded(v) for k, v in r.items()} for m, r in results.items()},
        },
    )
    print(f"written to {path}")


def _mib(values: object) -> str:
    assert isinstance(values, list)
    return " -> ".join(f"{v:.0f}" for v in values)


def _rounded(value: object) -> object:
    if isinstance(value, list):
        return [round(v, 1) for v in value]
    assert isinstance(value, float)
    return round(value, 1)


if __name__ == "__main__":
    main()
