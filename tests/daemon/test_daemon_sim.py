"""The daemon over the simulator: one loop, a Status every period, live changes that are
checked at once and applied at the next period, and a state file a daemon killed with
SIGKILL resumes from without moving any guest's memory abruptly. No VMs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from balloonist.daemon.control import GuestChange
from balloonist.daemon.counters import FailureCounter
from balloonist.daemon.service import DaemonLoop
from balloonist.daemon.sim_backend import SimBackend, sim_daemon
from balloonist.daemon.statefile import STATE_FILE
from balloonist.daemon.status import Status
from balloonist.errors import ConfigError
from balloonist.policy import DEFAULT_POLICY
from balloonist.policy.demand import DemandPolicy
from balloonist.units import MIB, PAGE_SIZE_BYTES
from tests.daemon.small_host import GUESTS, MEMORY, SMALL, small
from tests.waiting import wait_until

#: Generous deadlines for a shared 2-core machine; every wait polls a condition.
DEADLINE_S = 60.0


def status(daemon: DaemonLoop) -> Status:
    s = daemon.status()
    assert s is not None
    return s


def state_file(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((directory / STATE_FILE).read_text())
    return data


# -- the loop --------------------------------------------------------------------------


def test_the_loop_publishes_a_status_every_period_at_the_speed_asked(tmp_path: Path) -> None:
    daemon = sim_daemon(small(), state_dir=tmp_path, speed=50.0)
    assert daemon.status() is None
    stop = threading.Event()
    loop = threading.Thread(target=daemon.run, args=(stop,))
    seen: list[Status] = []

    def six_periods() -> bool:
        s = daemon.status()
        if s is not None and (not seen or s.version != seen[-1].version):
            seen.append(s)
        return len(seen) >= 6

    loop.start()
    try:
        wait_until(six_periods, DEADLINE_S, "six periods")
    finally:
        stop.set()
        loop.join(timeout=DEADLINE_S)
    assert not loop.is_alive()
    versions = [s.version for s in seen]
    assert versions == sorted(set(versions))
    times = [s.time_s for s in seen]
    assert times == sorted(set(times))
    for s in seen:
        assert {g.name for g in s.guests} == set(GUESTS)
        assert s.policy.name == DEFAULT_POLICY and s.policy.tax_rate == 0.75
        assert s.counters[FailureCounter.CYCLES_SKIPPED] == 0
    # One simulated period per version.
    assert seen[-1].time_s - seen[0].time_s == seen[-1].version - seen[0].version
    assert state_file(tmp_path)["periods"] >= seen[-1].version


def test_every_published_status_joins_the_history(tmp_path: Path) -> None:
    daemon = sim_daemon(small(), state_dir=tmp_path, speed=1000.0)
    assert daemon.history() == ()
    published = []
    for _ in range(4):
        daemon.step()
        published.append(status(daemon))
    points = daemon.history()
    assert [p.version for p in points] == [s.version for s in published]
    assert [p.time_s for p in points] == [s.time_s for s in published]
    last, newest = points[-1], published[-1]
    assert last.names == tuple(g.name for g in newest.guests) == GUESTS
    assert last.allocated_bytes == tuple(g.allocated_bytes for g in newest.guests)
    assert last.host_free_bytes == newest.host.free_bytes
    assert [p.version for p in daemon.history(published[1].version)] == [3, 4]


def test_run_waits_a_period_over_speed_between_periods(tmp_path: Path) -> None:
    speed = 10.0
    daemon = sim_daemon(small(), state_dir=tmp_path, speed=speed)
    daemon.step()  # the first period may compile the simulator's core; not timed
    stop = threading.Event()
    loop = threading.Thread(target=daemon.run, args=(stop,))
    started = time.monotonic()
    loop.start()
    try:
        wait_until(lambda: status(daemon).version >= 7, DEADLINE_S, "seven periods")
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        loop.join(timeout=DEADLINE_S)
    # Six periods in run(), so five waits of period_s / speed = 0.1 s between them:
    # without the pacing they take about 0.2 s here.
    assert elapsed >= 5 * 1.0 / speed


@pytest.mark.parametrize("speed", [0.0, -1.0, math.nan, math.inf, 1001.0])
def test_a_bad_speed_is_refused(speed: float) -> None:
    with pytest.raises(ConfigError) as err:
        SimBackend(small(), speed=speed)
    assert err.value.where == "--speed"


# -- live changes ----------------------------------------------------------------------


def stepped(tmp_path: Path, periods: int = 3) -> DaemonLoop:
    daemon = sim_daemon(small(), state_dir=tmp_path, speed=1000.0)
    for _ in range(periods):
        daemon.step()
    return daemon


def specs(s: Status) -> dict[str, tuple[int, int, int]]:
    return {g.name: (g.min_bytes, g.max_bytes, g.shares) for g in s.guests}


@pytest.mark.parametrize(
    ("name", "change", "field"),
    [
        ("nobody", GuestChange(shares=10), "name"),
        ("busy", GuestChange(min_bytes=200 * MIB, max_bytes=100 * MIB), "min_bytes"),
        ("busy", GuestChange(max_bytes=512 * MIB), "max_bytes"),
        ("busy", GuestChange(max_bytes=100 * MIB + 1), "max_bytes"),
        ("busy", GuestChange(shares=0), "shares"),
        ("busy", GuestChange(min_bytes=-PAGE_SIZE_BYTES), "min_bytes"),
    ],
)
def test_a_bad_change_names_the_field_and_changes_nothing(
    tmp_path: Path, name: str, change: GuestChange, field: str
) -> None:
    daemon = stepped(tmp_path)
    before = specs(status(daemon))
    saved = state_file(tmp_path)["guests"]
    with pytest.raises(ConfigError) as err:
        daemon.change_guest(name, change)
    assert err.value.where == field
    daemon.step()
    assert specs(status(daemon)) == before
    after = state_file(tmp_path)["guests"]
    for guest in GUESTS:
        assert after[guest]["changed"] == saved[guest]["changed"]
        assert after[guest]["max_bytes"] == saved[guest]["max_bytes"]


def test_reservations_that_would_not_fit_the_host_are_refused(tmp_path: Path) -> None:
    daemon = stepped(tmp_path, periods=1)
    daemon.change_guest("busy", GuestChange(min_bytes=200 * MIB))
    daemon.change_guest("idle", GuestChange(min_bytes=200 * MIB))
    with pytest.raises(ConfigError) as err:  # 600 MiB of reservations on a 512 MiB host
        daemon.change_guest("small", GuestChange(min_bytes=200 * MIB))
    assert err.value.where == "min_bytes"


def test_a_valid_change_takes_effect_at_the_next_period_and_is_recorded(
    tmp_path: Path,
) -> None:
    daemon = stepped(tmp_path, periods=8)
    assert status(daemon).guest("busy").allocation_target_bytes > 100 * MIB  # type: ignore[union-attr]
    daemon.change_guest("busy", GuestChange(max_bytes=100 * MIB))
    daemon.change_guest("busy", GuestChange(shares=3000))  # merges with the queued one
    assert specs(status(daemon))["busy"] == (0, MEMORY, 1000)  # not before the next period
    daemon.step()
    busy = status(daemon).guest("busy")
    assert busy is not None
    assert (busy.min_bytes, busy.max_bytes, busy.shares) == (0, 100 * MIB, 3000)
    assert busy.allocation_target_bytes <= 100 * MIB
    # The register enforces the limit from this period on: the balloon heads for it.
    assert daemon.backend.guest_states()["busy"].balloon_target_bytes == MEMORY - 100 * MIB
    saved = state_file(tmp_path)["guests"]["busy"]
    assert saved["changed"] == {
        "min_bytes": None,
        "max_bytes": 100 * MIB,
        "shares": 3000,
        "min_cpus": None,
        "max_cpus": None,
        "cpu_shares": None,
    }
    assert (saved["max_bytes"], saved["shares"]) == (100 * MIB, 3000)
    for _ in range(40):
        daemon.step()
    assert status(daemon).guest("busy").allocated_bytes <= 100 * MIB  # type: ignore[union-attr]


@pytest.mark.parametrize("tax", [1.0, -0.1, math.nan, True])
def test_a_bad_tax_rate_is_refused(tmp_path: Path, tax: float) -> None:
    daemon = stepped(tmp_path, periods=1)
    with pytest.raises(ConfigError) as err:
        daemon.change_policy(tax_rate=tax)
    assert err.value.where == "tax_rate"
    daemon.step()
    assert status(daemon).policy.tax_rate == 0.75


def test_a_tax_change_rebuilds_the_policy_at_the_next_period_and_survives_a_restart(
    tmp_path: Path,
) -> None:
    daemon = stepped(tmp_path, periods=1)
    daemon.change_policy(tax_rate=0.25)
    assert status(daemon).policy.tax_rate == 0.75
    daemon.step()
    assert status(daemon).policy.tax_rate == 0.25
    policy = daemon.scheduler.policy
    assert isinstance(policy, DemandPolicy) and policy.tax_rate == 0.25
    assert state_file(tmp_path)["policy"] == {
        "name": DEFAULT_POLICY,
        "tax_rate": 0.25,
        "changed_tax_rate": 0.25,
    }
    restarted = sim_daemon(small(), state_dir=tmp_path, speed=1000.0)
    restarted.step()
    assert status(restarted).policy.tax_rate == 0.25


def test_changes_from_another_thread_land_between_periods(tmp_path: Path) -> None:
    daemon = sim_daemon(small(), state_dir=tmp_path, speed=1000.0)
    stop = threading.Event()
    loop = threading.Thread(target=daemon.run, args=(stop,))
    loop.start()
    try:
        wait_until(lambda: daemon.status() is not None, DEADLINE_S, "a first status")
        daemon.change_guest("idle", GuestChange(min_bytes=64 * MIB, shares=500))
        wait_until(
            lambda: specs(status(daemon))["idle"] == (64 * MIB, MEMORY, 500),
            DEADLINE_S,
            "the change applied",
        )
    finally:
        stop.set()
        loop.join(timeout=DEADLINE_S)
    assert not loop.is_alive()


# -- restarts --------------------------------------------------------------------------


def balloons(daemon: DaemonLoop) -> dict[str, int]:
    return {name: s.balloon_bytes for name, s in daemon.backend.guest_states().items()}


def test_a_daemon_killed_with_sigkill_resumes_its_specs_and_targets(tmp_path: Path) -> None:
    """The issue's test: SIGKILL the daemon mid-run over a simulated host, restart it;
    specs (including a live change) and targets are intact, and no guest's allocation
    moves by more than one rate-limited step in the first period after the restart."""
    scenario_path = tmp_path / "small.toml"
    scenario_path.write_text(SMALL)
    state_dir = tmp_path / "state"
    # A live change, made the way any is (the Controller), persisted by a first run.
    first = sim_daemon(small(), state_dir=state_dir, speed=1000.0)
    first.step()
    first.change_guest("busy", GuestChange(max_bytes=160 * MIB, shares=2000))
    first.step()
    first.close()
    periods_before = state_file(state_dir)["periods"]
    assert state_file(state_dir)["guests"]["busy"]["changed"]["max_bytes"] == 160 * MIB

    log_path = tmp_path / "daemon.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "balloonist", "daemon", "--sim", str(scenario_path),
             "--speed", "200", "--state-dir", str(state_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:

        def well_under_way() -> bool:
            saved = state_file(state_dir)  # renamed into place whole: always parses
            return saved["periods"] >= periods_before + 20 and all(
                g["estimate"] is not None for g in saved["guests"].values()
            )

        wait_until(well_under_way, DEADLINE_S, log_path.read_text)
        assert proc.poll() is None, log_path.read_text()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert "resumed from" in log_path.read_text()

    saved = state_file(state_dir)
    busy = saved["guests"]["busy"]
    assert (busy["max_bytes"], busy["shares"]) == (160 * MIB, 2000)  # the live change held

    # A kill in the middle of a write may leave its temporary; a restart removes it.
    restarted = sim_daemon(small(), state_dir=state_dir, speed=1000.0)
    assert not list(state_dir.glob(".daemon-state.json.*"))
    assert balloons(restarted) == {n: g["balloon_bytes"] for n, g in saved["guests"].items()}
    restarted.step()
    now = status(restarted)
    assert now.time_s == saved["time_s"]  # the simulated clock resumed
    for g in now.guests:
        was = saved["guests"][g.name]
        assert (g.min_bytes, g.max_bytes, g.shares) == (
            was["min_bytes"],
            was["max_bytes"],
            was["shares"],
        )
        assert g.balloon_bytes == was["balloon_bytes"]  # it starts where it was
        assert g.balloon_target_bytes == was["balloon_target_bytes"]
    # One period later each balloon has moved at most one step of the driver's rate
    # controller, which (like any restarted driver's) starts at its minimum.
    step_bytes = small().rate.min_units * PAGE_SIZE_BYTES
    for name, balloon in balloons(restarted).items():
        moved = abs(balloon - saved["guests"][name]["balloon_bytes"])
        assert moved <= step_bytes, (name, moved)
    assert state_file(state_dir)["periods"] == saved["periods"] + 1


def test_a_temporary_left_by_a_killed_write_is_removed_and_the_state_kept(
    tmp_path: Path,
) -> None:
    daemon = stepped(tmp_path, periods=2)
    daemon.close()
    saved = (tmp_path / STATE_FILE).read_text()
    leftover = tmp_path / f".{STATE_FILE}.k1ll3d"
    leftover.write_text(saved[:10])  # half a write
    sim_daemon(small(), state_dir=tmp_path, speed=1000.0)
    assert not leftover.exists()
    assert (tmp_path / STATE_FILE).read_text() == saved


def test_a_corrupt_state_file_is_set_aside_with_one_error_and_the_daemon_starts_fresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = stepped(tmp_path, periods=2)
    daemon.close()
    path = tmp_path / STATE_FILE
    torn = path.read_bytes()[:-40]  # what a non-atomic writer would leave
    path.write_bytes(torn)
    with caplog.at_level("INFO", logger="balloonist.daemon"):
        fresh = sim_daemon(small(), state_dir=tmp_path, speed=1000.0)
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "corrupt" in errors[0].getMessage()
    aside = list(tmp_path.glob(f"{STATE_FILE}.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == torn  # kept as it was
    assert aside[0].name in errors[0].getMessage()
    assert not path.exists()
    assert balloons(fresh) == dict.fromkeys(GUESTS, 0)  # fresh guests, nothing restored
    fresh.step()
    assert state_file(tmp_path)["periods"] == 1
    assert status(fresh).time_s == 0.0


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["guests"]["busy"].update(shares=0),
        lambda d: d.update(format=2),
        lambda d: d["guests"]["busy"].update(surprise=1),
        lambda d: d.pop("policy"),
    ],
)
def test_a_state_file_that_breaks_the_schema_is_corrupt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, edit: Callable[[dict[str, Any]], None]
) -> None:
    stepped(tmp_path, periods=1).close()
    data = state_file(tmp_path)
    edit(data)
    (tmp_path / STATE_FILE).write_text(json.dumps(data))
    fresh = sim_daemon(small(), state_dir=tmp_path, speed=1000.0)
    assert "corrupt" in caplog.text
    assert len(list(tmp_path.glob(f"{STATE_FILE}.corrupt-*"))) == 1
    fresh.step()
    assert state_file(tmp_path)["periods"] == 1


def test_another_scenarios_state_is_set_aside_not_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stepped(tmp_path, periods=1).close()
    data = state_file(tmp_path)
    data["scenario"] = "other"
    (tmp_path / STATE_FILE).write_text(json.dumps(data))
    sim_daemon(small(), state_dir=tmp_path, speed=1000.0).step()
    assert "set aside" in caplog.text
    assert len(list(tmp_path.glob(f"{STATE_FILE}.other-*"))) == 1
    assert state_file(tmp_path)["periods"] == 1


# -- the command line ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sim", "/nonexistent/s.toml"], "/nonexistent/s.toml: no such file"),
        (["--sim", "--speed", "0"], "--speed: must be above 0"),
        (["--sim", "--speed", "5000"], "--speed: must be above 0 and at most 1000"),
        (["--speed", "2"], "--speed: is for --sim only"),
        (["--sim", "--config", "host.toml"], "--config: a simulated host is configured"),
    ],
)
def test_bad_daemon_input_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    from balloonist import cli

    assert cli.main(["daemon", "--state-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / STATE_FILE).exists()


def test_daemon_sim_runs_the_demo_by_default_and_sigterm_stops_it_cleanly(
    tmp_path: Path,
) -> None:
    # No --state-dir: the default, a directory per scenario under the runtime dir.
    state_dir = tmp_path / "balloonist" / "sim" / "demo"
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    log_path = tmp_path / "daemon.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "balloonist", "daemon", "--sim", "--speed", "1000"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_until(
            lambda: (state_dir / STATE_FILE).exists() and state_file(state_dir)["periods"] >= 2,
            DEADLINE_S,
            log_path.read_text,
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE_S) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    saved = state_file(state_dir)
    assert saved["scenario"] == "demo"
    assert set(saved["guests"]) == {"busy", "idle", "phased"}
    assert "stopped" in log_path.read_text()


def test_a_live_change_of_processors_applies_and_survives_a_restart(tmp_path: Path) -> None:
    from balloonist.sim.scenario import load_scenario_or_demo

    demo = load_scenario_or_demo(None)  # the built-in demo shares 4 processors
    daemon = sim_daemon(demo, state_dir=tmp_path, speed=1000.0)
    daemon.step()
    with pytest.raises(ConfigError) as caught:
        daemon.change_guest("busy", GuestChange(min_cpus=5))
    assert (
        caught.value.where == "min_cpus"
        and caught.value.message == "min_cpus 5 is above max_cpus 4"
    )
    daemon.change_guest("busy", GuestChange(min_cpus=3, cpu_shares=4000))
    daemon.step()
    busy = status(daemon).guest("busy")
    assert busy is not None and busy.cpu is not None
    assert (busy.cpu.min_cpus, busy.cpu.shares) == (3, 4000)
    assert busy.cpu.allocation_target_cpus >= 3
    daemon.close()

    restarted = sim_daemon(demo, state_dir=tmp_path, speed=1000.0)
    restarted.step()
    again = status(restarted).guest("busy")
    assert again is not None and again.cpu is not None
    assert (again.cpu.min_cpus, again.cpu.shares) == (3, 4000)
