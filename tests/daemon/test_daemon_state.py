"""The QEMU daemon's side of operating it, over fake VMs: a Status per period with
failure counters, live changes recorded in vm.json and daemon-state.json and kept
across a restart, and files written atomically. No QEMU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from balloonist.atomicfile import write_atomic
from balloonist.daemon.control import GuestChange
from balloonist.daemon.counters import FailureCounter
from balloonist.daemon.pacing import HOST_RATE_LIMITS
from balloonist.daemon.service import Daemon, DaemonConfig
from balloonist.daemon.statefile import STATE_FILE
from balloonist.errors import ConfigError
from balloonist.qemu.launcher import StateDir
from balloonist.units import GIB, MIB, PAGE_SIZE_BYTES
from tests.daemon.fakes import HOST, FakeVm, make

FIRST_STEP_BYTES = HOST_RATE_LIMITS.min_units * PAGE_SIZE_BYTES


def restart(tmp_path: Path, vms: dict[str, FakeVm], config: dict[str, object]) -> Daemon:
    t = iter(range(10**6))
    return Daemon(
        DaemonConfig.model_validate(config),
        StateDir(tmp_path),
        clock=lambda: float(next(t)),
        meminfo=lambda: HOST,
        connector=lambda r: vms[r.name],
    )


def test_every_period_publishes_a_status_with_failure_counters(tmp_path: Path) -> None:
    vms = {
        "flaky": FakeVm(2 * GIB, 2 * GIB, fail_next=2),
        "broken": FakeVm(2 * GIB, 2 * GIB, fatal=True),
        "fine": FakeVm(2 * GIB, 2 * GIB),
    }
    daemon = make(tmp_path, vms, budget="4GiB")
    versions = []
    for _ in range(5):
        daemon.step()
        status = daemon.status()
        assert status is not None
        versions.append(status.version)
    assert versions == [1, 2, 3, 4, 5]
    assert status is not None
    assert status.counters[FailureCounter.TRANSIENT_ERRORS] == 2
    assert status.counters[FailureCounter.FATAL_ERRORS] == 1
    assert status.counters[FailureCounter.CYCLES_SKIPPED] == 0
    flaky = status.guest("flaky")
    assert flaky is not None and flaky.counters[FailureCounter.TRANSIENT_ERRORS] == 2
    assert {g.name for g in status.guests} == {"flaky", "fine"}  # broken: never sampled


def test_a_live_change_goes_into_vm_json_and_the_state_file_and_survives_a_restart(
    tmp_path: Path,
) -> None:
    vms = {"a": FakeVm(2 * GIB, 2 * GIB), "b": FakeVm(2 * GIB, 2 * GIB)}
    daemon = make(tmp_path, vms)
    daemon.step()
    with pytest.raises(ConfigError) as err:
        daemon.change_guest("a", GuestChange(max_bytes=3 * GIB))
    assert err.value.where == "max_bytes"
    daemon.change_guest("a", GuestChange(max_bytes=1 * GIB, shares=3000))
    assert StateDir(tmp_path).load("a").max_bytes == 2 * GIB  # only at the next period
    sent_before = len(vms["a"].targets)
    daemon.step()
    record = StateDir(tmp_path).load("a")
    assert (record.max_bytes, record.shares) == (1 * GIB, 3000)
    # Down to the new max in paced steps, not in one jump.
    for _ in range(10):
        daemon.step()
    after = vms["a"].targets[sent_before:]
    assert after[0] > 1 * GIB and after[-1] == 1 * GIB
    assert after == sorted(after, reverse=True)
    saved = json.loads((tmp_path / STATE_FILE).read_text())
    assert saved["backend"] == "qemu"
    assert saved["guests"]["a"]["changed"] == {
        "min_bytes": None,
        "max_bytes": 1 * GIB,
        "shares": 3000,
        "min_cpus": None,
        "max_cpus": None,
        "cpu_shares": None,
    }
    assert saved["guests"]["a"]["balloon_target_bytes"] == 2 * GIB - vms["a"].targets[-1]
    daemon.close()

    # Restarted with host.toml overriding a's max: the live change still wins.
    again = restart(tmp_path, vms, {"daemon": {"budget": "3GiB"}, "vms": {"a": {"max": "1536MiB"}}})
    again.step()
    status = again.status()
    assert status is not None
    a = status.guest("a")
    assert a is not None and (a.max_bytes, a.shares) == (1 * GIB, 3000)


def test_a_restart_moves_no_guest_and_keeps_counting_periods(tmp_path: Path) -> None:
    vms = {"a": FakeVm(2 * GIB, 1200 * MIB), "b": FakeVm(2 * GIB, 900 * MIB)}
    daemon = make(tmp_path, vms, budget="1GiB")
    for _ in range(3):
        daemon.step()
    periods = json.loads((tmp_path / STATE_FILE).read_text())["periods"]
    # Where each guest is when the restarted daemon asks (a fake VM reaches its
    # target at the next read).
    held = {name: vm.target or vm.actual for name, vm in vms.items()}
    sent = {name: len(vm.targets) for name, vm in vms.items()}
    # A crash: the first daemon is abandoned, not closed.
    again = restart(tmp_path, vms, {"daemon": {"budget": "1GiB"}})
    again.step()
    for name, vm in vms.items():
        first = vm.targets[sent[name] :]
        assert first  # still over budget: it acts
        # The pacer starts where the guest is (rule 3) and takes the smallest step.
        assert held[name] - FIRST_STEP_BYTES <= first[0] <= held[name]
    assert json.loads((tmp_path / STATE_FILE).read_text())["periods"] == periods + 1


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f.json"
    write_atomic(path, "old\n")

    def no_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_disk)
    with pytest.raises(OSError):
        write_atomic(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_a_balloon_that_stalls_is_counted_once_as_a_stall_and_as_uncooperative(
    tmp_path: Path,
) -> None:
    # Over budget, and "stuck" never moves: the pacer gives up on it after the stall
    # timeout (the fake clock ticks at every read), and probes it now and then.
    vms = {"stuck": FakeVm(2 * GIB, 2 * GIB, speed=0), "fine": FakeVm(2 * GIB, 2 * GIB)}
    daemon = make(tmp_path, vms, budget="3GiB")
    for _ in range(60):
        daemon.step()
    status = daemon.status()
    assert status is not None
    assert status.counters[FailureCounter.STALLS] == 1
    assert status.counters[FailureCounter.UNCOOPERATIVE] == 1
    assert status.counters[FailureCounter.CYCLES_SKIPPED] == 0
    stuck = status.guest("stuck")
    assert stuck is not None and not stuck.cooperative
    assert stuck.counters == {
        "uncooperative": 1,
        "backend_errors_transient": 0,
        "backend_errors_fatal": 0,
        "stalls": 1,
        "agent_rejected": 0,
    }


def test_a_held_guest_that_leaves_no_room_holds_the_others_at_their_minimum(
    tmp_path: Path,
) -> None:
    # "stuck" turns uncooperative and is held at 2 GiB: with "fine"'s 256 MiB minimum
    # that is more than the 2 GiB budget. The policy must still decide (everyone at
    # the minimum the physical situation allows), not skip every cycle.
    vms = {"stuck": FakeVm(2 * GIB, 2 * GIB, speed=0), "fine": FakeVm(2 * GIB, 2 * GIB)}
    daemon = make(tmp_path, vms, budget="2GiB")
    for _ in range(80):
        daemon.step()
    status = daemon.status()
    assert status is not None
    stuck = status.guest("stuck")
    assert stuck is not None and not stuck.cooperative
    assert status.counters[FailureCounter.CYCLES_SKIPPED] == 0
    assert vms["fine"].actual == 256 * MIB  # its minimum
