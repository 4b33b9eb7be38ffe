"""Inflate speed of our agent vs. virtio-balloon, 256 MiB on the same 512 MiB guest.

One agent VM (RAM in a shared file, the agent .pyz running in it over a 9p root) is
ballooned by 256 MiB three ways, each REPEATS times, deflating fully in between:

- virtio-balloon: one QMP ``balloon`` command, timed until ``query-balloon`` shows it;
- agent, paced: the agent with its default adaptive rate (starts at 4 MiB/s, grows
  16 MiB/s per successful 0.2 s step), timed until the host has verified and freed
  256 MiB in the RAM file;
- agent, unpaced: the same agent started with ``--rate-start`` at its ceiling, which
  measures the mechanism (mlock, pagemap, reports, the host's checks and punches,
  vCPUs paused around each) rather than the pacing policy. A second boot.

Anchor (issue 4): on KVM the Linux virtio-balloon driver does ~1.7 GB/s, sending 256
page numbers per message; the agent reports ranges. Under TCG everything in the guest
runs several times slower, so compare the two here, not with the anchor.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from _common import write_result
from _vm import ACCEL, assets, state_dir, stop_all, wait_line
from balloonist.agent.pyz import build_pyz
from balloonist.daemon.agent_link import AgentPort
from balloonist.qemu import launcher
from balloonist.qemu.assets import default_cache_dir, host_python
from balloonist.qemu.qmp import BalloonQMP
from balloonist.qemu.reclaim import GuestRam
from balloonist.units import MIB, PAGE_SIZE_BYTES

MEMORY_MIB = 512
BALLOON_MIB = 256
REPEATS = 3
TIMEOUT_S = 120.0
UNPACED = ("--rate-start", "1024", "--rate-max", "1024")


async def _until(condition: object, timeout_s: float) -> float:
    start = time.monotonic()
    while not condition():  # type: ignore[operator]
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"not reached in {timeout_s:.0f} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def _measure(record: launcher.VMRecord, modes: Sequence[str]) -> dict[str, list[float]]:
    assert record.agent_socket is not None and record.ram_file is not None
    # QEMU's QMP socket takes one client: the agent port's pause control is also the
    # connection that drives virtio-balloon.
    qmp = BalloonQMP(Path(record.qmp_socket), name=record.name)
    port = AgentPort(
        record.name,
        Path(record.agent_socket),
        GuestRam(Path(record.ram_file), record.memory_bytes),
        record.memory_bytes,
        clock=time.monotonic,
        control=qmp,
    )
    await port.connect()
    try:
        await _until(lambda: port.session.alive(time.monotonic()), TIMEOUT_S)
        pages = BALLOON_MIB * MIB // PAGE_SIZE_BYTES
        seconds: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(REPEATS):
            for mode in modes:
                if mode == "virtio-balloon":
                    await qmp.set_target((MEMORY_MIB - BALLOON_MIB) * MIB)
                    seconds[mode].append(
                        await qmp.wait_actual((MEMORY_MIB - BALLOON_MIB) * MIB, timeout_s=TIMEOUT_S)
                    )
                    await qmp.set_target(MEMORY_MIB * MIB)
                    await qmp.wait_actual(MEMORY_MIB * MIB, timeout_s=TIMEOUT_S)
                else:
                    await port.set_target((MEMORY_MIB - BALLOON_MIB) * MIB)
                    seconds[mode].append(
                        await _until(
                            lambda: port.session.verified_freed_pages() >= pages, TIMEOUT_S
                        )
                    )
                    await port.set_target(MEMORY_MIB * MIB)
                    await _until(lambda: port.session.held_pages() == 0, TIMEOUT_S)
                print(f"  {mode}: {seconds[mode][-1]:.2f} s", flush=True)
        return seconds
    finally:
        await port.close()
        port.release()


def _run(name: str, agent_args: Sequence[str], modes: Sequence[str]) -> dict[str, list[float]]:
    # where a host-root guest sees it: not under /tmp, which the guest mounts its own
    pyz = build_pyz(default_cache_dir().parent / "guest-shared" / "balloonist-agent.pyz")
    state = state_dir()
    try:
        request = assets().start_request(
            name,
            MEMORY_MIB * MIB,
            accel=ACCEL,
            agent=True,
            run=(host_python(), str(pyz), *agent_args),
        )
        record = launcher.start_vm(state, request)
        wait_line(record, "BALLOONIST-READY", 120.0)
        return asyncio.run(_measure(record, modes))
    finally:
        stop_all(state)


def main() -> None:
    seconds = _run("speed", (), ("virtio-balloon", "agent-paced"))
    seconds |= _run("speed-unpaced", UNPACED, ("agent-unpaced",))
    mib_s = {mode: BALLOON_MIB / statistics.median(s) for mode, s in seconds.items()}
    ratio = mib_s["agent-unpaced"] / mib_s["virtio-balloon"]
    accel = launcher.resolve_accel(ACCEL, launcher.qemu_binary())
    for mode, rate in mib_s.items():
        print(f"{mode:>15}: {rate:7.1f} MiB/s (median of {REPEATS} x {BALLOON_MIB} MiB)")
    print(f"agent (unpaced) / virtio-balloon: {ratio:.2f}x (accel {accel})")
    path = write_result(
        "agent_inflate",
        {
            "accel": accel,
            "guest_mib": MEMORY_MIB,
            "balloon_mib": BALLOON_MIB,
            "repeats": REPEATS,
            "seconds": {mode: [round(x, 3) for x in s] for mode, s in seconds.items()},
            "mib_per_s": {mode: round(rate, 1) for mode, rate in mib_s.items()},
            "agent_unpaced_over_virtio": round(ratio, 3),
        },
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
