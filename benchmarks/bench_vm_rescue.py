"""Time to rescue on a real guest: a process allocates 200 MiB at once in a guest whose
balloon holds memory, with the demand policy's rescue and without it.

Two idle 512 MiB guests (min 128 MiB) share a 480 MiB budget under the daemon, so each
is ballooned down to about 235 MiB. At 60 s "burst" allocates 200 MiB at once
(touchmem; the guest has no swap). The figure is how long the guest stays short of
its available floor (the daemon's ``available_floor``, 64 MiB): periods and seconds
from the first period that sees it short to the first that does not (none, if it is
still short 60 periods on), how short it was period by period, and whether anything
in it was OOM-killed. Without the rescue the guest waits for its working-set
averages; QEMU's ``deflate-on-oom`` keeps its process alive meanwhile by giving back
balloon pages a megabyte per OOM.

    python benchmarks/bench_vm_rescue.py
"""

from __future__ import annotations

import re
import time
from typing import Any

from _common import write_result
from _vm import boot, lines, state_dir, stop_all, wait_line
from balloonist.daemon.service import Daemon, DaemonConfig
from balloonist.daemon.status import GuestStatus
from balloonist.policy.demand import DemandPolicy
from balloonist.units import MIB

MEMORY_MIB = 512
MIN_MIB = 128
BURST_MIB = 200
BURST_AT_S = 60
SETTLED_BYTES = 300 * MIB
#: Periods watched after the first short one.
WINDOW_PERIODS = 60
OOM = re.compile(r"Out of memory|oom-kill|Killed process")


def _period(daemon: Daemon) -> None:
    started = time.monotonic()
    daemon.step()
    daemon.idle(max(0.0, 1.0 - (time.monotonic() - started)))


def _burst(daemon: Daemon) -> GuestStatus:
    status = daemon.status()
    assert status is not None
    guest = status.guest("burst")
    assert guest is not None
    return guest


def run(rescue: bool) -> dict[str, Any]:
    state = state_dir()
    try:
        record = boot(
            state, "burst", MEMORY_MIB, f"0@0,{BURST_MIB}@{BURST_AT_S}", min_bytes=MIN_MIB * MIB
        )
        boot(state, "donor", MEMORY_MIB, min_bytes=MIN_MIB * MIB)
        config = DaemonConfig.model_validate(
            {"daemon": {"budget": "560MiB"}, "ksm": {"mode": "off"}}
        )
        daemon = Daemon(config, state, policy=DemandPolicy(rescue=rescue))
        try:
            _period(daemon)
            while _burst(daemon).allocated_bytes > SETTLED_BYTES:
                _period(daemon)
            while not _burst(daemon).available_short_bytes:  # the burst comes
                _period(daemon)
            # from the first period that saw it short: how short, period by period
            short_mib = [(_burst(daemon).available_short_bytes or 0) // MIB]
            started = time.monotonic()
            took_s = None
            while len(short_mib) <= WINDOW_PERIODS and short_mib[-1] > 0:
                _period(daemon)
                short_mib.append((_burst(daemon).available_short_bytes or 0) // MIB)
            if short_mib[-1] == 0:
                took_s = round(time.monotonic() - started, 1)
        finally:
            daemon.close()
        wait_line(record, rf"resident_mib={BURST_MIB}\b", 30.0)
        rescued = short_mib[-1] == 0
        return {
            "periods_short": len(short_mib) - 1 if rescued else None,
            "seconds_short": took_s,
            "short_mib_by_period": short_mib,
            "oom_kills": sum(1 for line in lines(record) if OOM.search(line)),
            "accel": record.accel,
        }
    finally:
        stop_all(state)


def main() -> None:
    with_rescue = run(True)
    without = run(False)
    for name, r in (("with the rescue", with_rescue), ("without", without)):
        took = (
            f"short for {r['periods_short']} periods ({r['seconds_short']} s)"
            if r["periods_short"] is not None
            else f"still {r['short_mib_by_period'][-1]} MiB short after {WINDOW_PERIODS} periods"
        )
        print(f"200 MiB at once ({r['accel']}), {name}: {took}, {r['oom_kills']} OOM lines")
    path = write_result("vm_rescue", {"with_rescue": with_rescue, "without_rescue": without})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
