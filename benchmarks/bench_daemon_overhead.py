"""Daemon overhead: CPU seconds per VM per hour of management, with 3 VMs.

Three idle 384 MiB guests are managed by the daemon (1 s period) in this process for
RUN_S seconds; the daemon's CPU time is this process's user + system time over that
window (QEMU runs in its own processes and is not counted).
"""

from __future__ import annotations

import resource
import threading
import time

from _common import write_result
from _vm import boot, state_dir, stop_all
from balloonist.daemon.service import Daemon, DaemonConfig

RUN_S = 60.0
VMS = 3


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    state = state_dir()
    try:
        used_accel = None
        for i in range(VMS):
            used_accel = boot(state, f"vm{i}", 384, work="30@0").accel
        daemon = Daemon(DaemonConfig.model_validate({"daemon": {"budget": "900MiB"}}), state)
        daemon.step()  # connect, first targets: start-up, not steady management
        stop = threading.Event()
        cpu0, wall0 = cpu_s(), time.monotonic()
        timer = threading.Timer(RUN_S, stop.set)
        timer.start()
        daemon.run(stop)
        cpu, wall = cpu_s() - cpu0, time.monotonic() - wall0
    finally:
        stop_all(state)
    per_vm_hour = cpu / wall * 3600 / VMS
    print(
        f"daemon over {VMS} VMs for {wall:.0f} s: {cpu:.2f} CPU s; "
        f"{per_vm_hour:.1f} CPU s per VM per hour ({cpu / wall:.2%} of one core; {used_accel})"
    )
    path = write_result(
        "daemon_overhead",
        {
            "accel": used_accel,
            "vms": VMS,
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 3),
            "cpu_s_per_vm_hour": round(per_vm_hour, 2),
            "share_of_one_core": round(cpu / wall, 5),
        },
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
