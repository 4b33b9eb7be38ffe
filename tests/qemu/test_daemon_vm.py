"""The host daemon over real guests under TCG (``vm``).

Two 512 MiB guests share an 800 MiB budget. "busy" grows its working set from 50 to
380 MiB at 60 s (after the daemon has settled) and drops back to 50 MiB at 110 s;
"idle" uses 20 MiB. A third, "fixed" (256 MiB, its min and max its whole memory, the
budget 256 MiB larger), cannot be moved: it is there so that the host's count is
checked over three VMs. The daemon must move memory from idle to busy, give it back once
busy idles, never send a target outside [min, max], and keep managing busy after
idle's QEMU is killed.

Thresholds:
- MOVE_BYTES: 64 MiB, well above the 4 MiB the pacing treats as noise and well below
  the ~110 MiB that moved in a hand-run of the same set-up.
- DEADLINE_S: the move took about 15 s after busy grew, by hand, under TCG; 90 s,
  counted from busy's serial line saying it grew (its 60 s are on its own clock, which
  falls behind the host's on a loaded host: up to GUEST_CLOCK_SLOWDOWN times that).
- RETURN_BYTES: 32 MiB back from busy's peak and idle's low. Once busy idles, both
  guests head for the same split they had before busy grew, so asking for all of
  MOVE_BYTES back asked for an exact return to it: a CI run ended 3 MiB short of that
  after 360 s, at the equilibrium (busy still holds a little more, as it uses more).
  Half of the move is a clear return that does not depend on the last megabytes.
- RETURN_DEADLINE_S: giving memory back waits for the slow working-set average
  (30 s half-life) to come down. One run returned 64 MiB in about 100 s; a CI run had
  moved 76 and 67 MiB after 240 s. 360 s.
- HOST_AGREE: every period, what the daemon says each VM holds of the host's memory
  (its QEMU's smaps) must lie within 2 % of the kernel's own sum (smaps_rollup's Pss)
  read just before and just after the period: the same figure summed twice, apart by
  what the guest touched in between. The host's figures agree too: what the VMs hold
  together is the sum of theirs, and MemAvailable lies within 2 % of /proc/meminfo's,
  read just before and just after.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from balloonist.daemon.service import Daemon, DaemonConfig
from balloonist.qemu import launcher
from balloonist.qemu.assets import GuestAssets
from balloonist.units import MIB

from .conftest import GUEST_CLOCK_SLOWDOWN, boot, serial_lines, work_phase_began

pytestmark = pytest.mark.vm

MOVE_BYTES = 64 * MIB
DEADLINE_S = 90.0
GROW_AT_S = 60  # on busy's clock
MIN_BYTES = 128 * MIB
RETURN_BYTES = 32 * MIB
RETURN_DEADLINE_S = 360.0
HOST_AGREE = 0.02
HOST_PERIODS = 120  # two minutes of one-second periods


def pss_bytes(pid: int | None) -> int | None:
    """The process's proportional set size, from the kernel's own sum; None if gone."""
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    line = next(line for line in text.splitlines() if line.startswith("Pss:"))
    return int(line.split()[1]) * 1024


def mem_available_bytes() -> int:
    line = next(
        line for line in Path("/proc/meminfo").read_text().splitlines() if "MemAvailable" in line
    )
    return int(line.split()[1]) * 1024


def step_checking_host(daemon: Daemon, pids: dict[str, int | None]) -> int:
    """A period, and what the daemon says the host holds for each VM checked against
    its QEMU process's own smaps_rollup, read just before and just after (HOST_AGREE),
    and the host's own figures against /proc/meminfo. Returns how many VMs were checked."""
    before = {name: pss_bytes(pid) for name, pid in pids.items()}
    available_before = mem_available_bytes()
    daemon.step()
    available_after = mem_available_bytes()
    after = {name: pss_bytes(pid) for name, pid in pids.items()}
    status = daemon.status()
    assert status is not None
    truth = status.host.truth
    assert truth is not None
    low, high = sorted((available_before, available_after))
    assert low * (1 - HOST_AGREE) <= truth.available_bytes <= high * (1 + HOST_AGREE)
    counted = [g.host.held_bytes for g in status.guests if g.host is not None]
    if len(counted) == len(status.guests):
        assert truth.held_bytes == sum(counted)
    checked = 0
    for guest in status.guests:
        was, now = before.get(guest.name), after.get(guest.name)
        if was is None or now is None:
            continue  # its QEMU is gone
        assert guest.host is not None, guest.name
        low, high = min(was, now), max(was, now)
        held = guest.host.held_bytes
        assert low * (1 - HOST_AGREE) <= held <= high * (1 + HOST_AGREE), (guest, was, now)
        checked += 1
    return checked


def _actual(daemon: Daemon, name: str) -> int:
    view = daemon.hv.view(name)
    return (view.actual_bytes if view is not None else None) or 0


def sent_count(daemon: Daemon, name: str) -> int:
    view = daemon.hv.view(name)
    assert view is not None, f"{name} is not managed"
    return view.sent_count


def test_memory_follows_demand_targets_stay_in_bounds_and_a_dead_vm_is_dropped(
    state: launcher.StateDir, guest_assets: GuestAssets
) -> None:
    # busy boots last: its schedule runs on its own clock from its boot, and must not
    # start growing before the daemon has settled.
    fixed = 256 * MIB
    boot(state, guest_assets, "fixed", memory_mib=256, work="20@0", min_bytes=fixed)
    boot(state, guest_assets, "idle", work="20@0", min_bytes=MIN_BYTES)
    boot(state, guest_assets, "busy", work=f"50@0,380@{GROW_AT_S},50@110", min_bytes=MIN_BYTES)
    sent: list[tuple[str, int]] = []
    config = DaemonConfig.model_validate({"daemon": {"budget": "1056MiB"}})
    daemon = Daemon(config, state, on_target=lambda name, b: sent.append((name, b)))

    pids = {name: state.load(name).pid for name in ("busy", "idle", "fixed")}
    periods_of_three = [0]  # periods where the host's count was checked for all three

    def step() -> None:
        periods_of_three[0] += step_checking_host(daemon, pids) == len(pids)

    def run_until(condition: object, deadline_s: float) -> bool:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            started = time.monotonic()
            step()
            if callable(condition) and condition():
                return True
            daemon.idle(max(0.0, 1.0 - (time.monotonic() - started)))
        return False

    try:
        # settle: the budget is shared, both guests get ballooned down
        assert run_until(lambda: _actual(daemon, "busy") < 480 * MIB, 25)
        run_until(None, 5)
        busy0, idle0 = _actual(daemon, "busy"), _actual(daemon, "idle")
        assert busy0 < 480 * MIB and idle0 < 480 * MIB  # busy has not grown yet
        grown = run_until(
            lambda: work_phase_began(serial_lines(state.load("busy")), 380),
            GROW_AT_S * GUEST_CLOCK_SLOWDOWN,
        )
        assert grown, serial_lines(state.load("busy"))[-3:]
        moved = run_until(
            lambda: (
                _actual(daemon, "busy") >= busy0 + MOVE_BYTES
                and _actual(daemon, "idle") <= idle0 - MOVE_BYTES
            ),
            DEADLINE_S,
        )
        assert moved, (busy0, idle0, _actual(daemon, "busy"), _actual(daemon, "idle"))
        # busy may go on growing for a while: measure the return from its real peak
        extremes = {"busy": _actual(daemon, "busy"), "idle": _actual(daemon, "idle")}

        def given_back() -> bool:
            busy, idle = _actual(daemon, "busy"), _actual(daemon, "idle")
            extremes["busy"] = max(extremes["busy"], busy)
            extremes["idle"] = min(extremes["idle"], idle)
            return (
                busy <= extremes["busy"] - RETURN_BYTES and idle >= extremes["idle"] + RETURN_BYTES
            )

        returned = run_until(given_back, RETURN_DEADLINE_S)
        assert returned, (extremes, _actual(daemon, "busy"), _actual(daemon, "idle"))
        # The host's count, checked over three VMs for two minutes of periods at least.
        assert run_until(lambda: periods_of_three[0] >= HOST_PERIODS, HOST_PERIODS * 1.5)
        assert sent and all(MIN_BYTES <= b <= 512 * MIB for n, b in sent if n != "fixed")
        assert all(b == fixed for n, b in sent if n == "fixed")

        idle = state.load("idle")
        assert idle.pid is not None
        os.kill(idle.pid, signal.SIGKILL)
        assert run_until(lambda: daemon.hv.managed() == ["busy", "fixed"], 30)
        before = sent_count(daemon, "busy")
        daemon.step()
        assert daemon.hv.managed() == ["busy", "fixed"]
        assert sent_count(daemon, "busy") >= before  # still served, no crash
    finally:
        daemon.close()


def test_the_cli_daemon_refuses_a_bad_config(tmp_path: Path) -> None:
    from balloonist.cli import main

    bad = tmp_path / "host.toml"
    bad.write_text('[daemon]\nbudget = "800"\n')
    assert main(["daemon", "--config", str(bad), "--state-dir", str(tmp_path)]) == 2
