"""The rescue on a real guest: a process that allocates 200 MiB at once, in a guest
whose balloon holds memory, gets it back within 2 periods and is not OOM-killed.

Two idle 512 MiB guests share a 480 MiB budget, so each is ballooned down to about
235 MiB. Then "burst" allocates 200 MiB at once (touchmem, no swap in the guest): its
available memory falls under the daemon's floor (64 MiB), and the daemon must give
it memory back, from the other guest's idle memory, within 2 periods of seeing it
short, instead of waiting for its working-set averages.

Thresholds:
- RESCUE_PERIODS: 2, as the issue asks. The first period sees the guest short and
  inflates the donor; the burst guest deflates into what that freed in the next,
  and holds it by the one after. The burst takes longer than a period to allocate
  under TCG, so the first period sees only part of it: the rescue must ask for what
  the burst goes on to use too (its last interval's use), or it takes a period more.
  The periods count from the first in which the guest is short enough to be rescued
  (``RESCUE_SHORT_BYTES``): less is what a guest the pacing holds at its floor shows.
  A clean-clone CI run here failed when the first period caught the burst 7 MiB
  short, the next 60 MiB: the rescue came 2 periods after that one.
  Since stop 48 the policy's *reach* may serve the burst from the donor's unused
  memory as soon as it sees the guest grow: a guest that holds all 200 MiB without
  ever running short counts as served in 0 periods (a clean-clone CI run failed
  "never short" once).
- BURST_AT_S: touchmem's start to the burst. The guests boot in about 10 s under TCG
  and the daemon takes about 280 MiB from each at its paced rate (16 MiB/s at first,
  growing) in about 20 s; 60 s leaves room for a slow machine, and the test checks
  the balloon had settled before the burst rather than trusting the time. The burst
  is on the guest's clock, which falls behind the host's on a loaded host, so the
  wait for it allows GUEST_CLOCK_SLOWDOWN times that, and 90 s more.
"""

from __future__ import annotations

import re
import time

import pytest

from balloonist.daemon.pacing import REACHED_TOLERANCE_BYTES
from balloonist.daemon.service import Daemon, DaemonConfig
from balloonist.policy.demand import RESCUE_SHORT_BYTES, DemandPolicy
from balloonist.qemu import launcher
from balloonist.qemu.assets import GuestAssets
from balloonist.units import MIB

from .conftest import GUEST_CLOCK_SLOWDOWN, boot, guest_status, serial_lines, stepper

pytestmark = pytest.mark.vm

MEMORY_MIB = 512
MIN_MIB = 128
BURST_MIB = 200
BURST_AT_S = 60
RESCUE_PERIODS = 2
#: Ballooned down to this or below before the burst: else the burst fits as it is.
SETTLED_BYTES = 300 * MIB
OOM = re.compile(r"Out of memory|oom-kill|Killed process")


def _resident_mib(lines: list[str]) -> int | None:
    for line in reversed(lines):
        if m := re.search(r"BALLOONIST-WORK .*resident_mib=(\d+)", line):
            return int(m.group(1))
    return None


def burst_and_rescue(
    state: launcher.StateDir, guest_assets: GuestAssets, *, rescue: bool
) -> tuple[int, list[str], list[str]]:
    """Boot the two guests, wait out the burst; the periods from the first in which the
    burst guest was short enough to be rescued to the first in which it held the
    memory it was no longer short with, its serial lines, and per period from that
    first one: both guests' sizes and how short the burst guest was (for a failure's
    message)."""
    work = f"0@0,{BURST_MIB}@{BURST_AT_S}"
    for name, load in (("burst", work), ("donor", None)):
        boot(state, guest_assets, name, memory_mib=MEMORY_MIB, min_bytes=MIN_MIB * MIB, work=load)
    config = DaemonConfig.model_validate({"daemon": {"budget": "560MiB"}, "ksm": {"mode": "off"}})
    daemon = Daemon(config, state, policy=DemandPolicy(rescue=rescue))
    run_until = stepper(daemon)
    record = state.load("burst")
    try:
        settled = run_until(
            lambda: guest_status(daemon, "burst").allocated_bytes <= SETTLED_BYTES,
            BURST_AT_S - 15.0,
        )
        assert settled, guest_status(daemon, "burst")
        assert _resident_mib(serial_lines(record)) == 0, "the burst came before the balloon settled"
        held: list[int] = []  # its size by QEMU, each period from that first one
        trace: list[str] = []
        end = time.monotonic() + BURST_AT_S * GUEST_CLOCK_SLOWDOWN + 90.0
        while time.monotonic() < end:
            run_until(None, 1.0)  # one period
            burst = guest_status(daemon, "burst")
            short_bytes = burst.available_short_bytes or 0
            if not held and short_bytes == 0:
                lines = serial_lines(record)
                if _resident_mib(lines) == BURST_MIB:
                    # The demand policy's reach gave the growing guest the donor's
                    # unused memory before it ever ran short: served in 0 periods.
                    return 0, lines, ["served before it ran short"]
            if short_bytes >= RESCUE_SHORT_BYTES or held:
                held.append(burst.allocated_bytes)
                donor = guest_status(daemon, "donor").allocated_bytes
                trace.append(
                    f"burst {burst.allocated_bytes // MIB} MiB, "
                    f"{short_bytes // MIB} short; donor {donor // MIB}"
                )
            if held and short_bytes == 0:
                # Its statistics come on a 1 s timer of their own and may show the
                # guest a period late; QEMU's count of its balloon is read fresh. It
                # was rescued in the first period it held what it was seen whole with.
                whole = held[-1] - REACHED_TOLERANCE_BYTES
                took = next(i for i, b in enumerate(held) if b >= whole)
                return took, serial_lines(record), trace
        raise AssertionError(f"burst: never short, or never rescued (sizes {held})")
    finally:
        daemon.close()


def test_a_guest_allocating_200_mib_at_once_gets_memory_within_2_periods_and_lives(
    state: launcher.StateDir, guest_assets: GuestAssets
) -> None:
    took, lines, trace = burst_and_rescue(state, guest_assets, rescue=True)
    assert took <= RESCUE_PERIODS, (took, trace)
    # the process runs on with all it asked for, and nothing was OOM-killed
    deadline = time.monotonic() + 10.0
    while _resident_mib(lines) != BURST_MIB and time.monotonic() < deadline:
        time.sleep(0.5)
        lines = serial_lines(state.load("burst"))
    assert _resident_mib(lines) == BURST_MIB, lines[-5:]
    assert not [line for line in lines if OOM.search(line)]
