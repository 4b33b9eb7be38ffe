"""The daemon's KSM: run by free memory while balloonist manages it, never fought
over, put back as found; and shown in the daemon's status."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from balloonist.daemon.counters import FailureCounter
from balloonist.daemon.ksm_control import KsmClaim, KsmControl, KsmMode
from balloonist.ksm import KsmKnobs, KsmParams, KsmTotals
from balloonist.model import HostHeld
from balloonist.units import GIB, MIB
from tests.daemon.fakes import FakeKsm, FakeMemoryHost, FakeVm, make

P = KsmParams()
FOUND = KsmKnobs(0, 100, 20)


def test_it_starts_below_the_threshold_speeds_up_and_stops_when_memory_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = FakeKsm()
    control = KsmControl(host, P)
    caplog.set_level(logging.INFO, logger="balloonist.daemon")
    for free in (0.5, 0.15, 0.05, 0.25, 0.35):
        control.step(free)
    assert control.mode is KsmMode.MANAGING
    # 25 % free: between the thresholds it keeps running, at the slowest rate.
    assert [k.run for k in host.written] == [1, 1, 1, 0]
    assert [k.pages_to_scan for k in host.written] == [325, 775, 100, 100]
    assert "KSM started: 15% of the VMs' memory is free" in caplog.text
    assert "KSM stopped: 35% of the VMs' memory is free" in caplog.text
    assert control.status().knobs == KsmKnobs(0, 100, 20)


def test_ksm_already_running_is_left_alone_and_says_why() -> None:
    host = FakeKsm(knobs_now=KsmKnobs(1, 300, 50))
    control = KsmControl(host, P)
    for free in (0.5, 0.0, 0.5):
        control.step(free)
    status = control.status()
    assert status.mode is KsmMode.LEFT_ALONE and status.knobs == KsmKnobs(1, 300, 50)
    assert status.reason is not None and "already running" in status.reason
    control.close()
    assert host.written == []


def test_a_change_made_by_someone_else_hands_ksm_over_for_good() -> None:
    host = FakeKsm()
    control = KsmControl(host, P)
    control.step(0.1)  # balloonist starts it
    host.knobs_now = KsmKnobs(1, 5000, 10)  # an administrator's own setting
    control.step(0.9)  # would have stopped it
    control.step(0.9)
    control.close()
    assert len(host.written) == 1
    assert host.knobs_now == KsmKnobs(1, 5000, 10)
    status = control.status()
    assert status.reason is not None and "changed outside balloonist" in status.reason


def test_closing_puts_back_what_was_found() -> None:
    host = FakeKsm(knobs_now=KsmKnobs(0, 64, 200))
    control = KsmControl(host, P)
    control.step(0.05)
    assert host.knobs_now.running
    control.close()
    assert host.knobs_now == KsmKnobs(0, 64, 200)
    assert control.mode is KsmMode.CLOSED
    control.step(0.05)  # after close: nothing
    assert host.knobs_now == KsmKnobs(0, 64, 200)


def test_a_host_that_refuses_writes_makes_ksm_unavailable_counted_once() -> None:
    host = FakeKsm(refuse=True)
    control = KsmControl(host, P)
    control.step(0.5)  # nothing to write yet
    assert control.status().mode is KsmMode.MANAGING
    control.step(0.05)
    control.step(0.05)
    assert control.status().mode is KsmMode.UNAVAILABLE
    assert control.errors == 1
    assert "permission denied" in (control.status().reason or "")


def test_a_read_that_fails_is_counted_and_the_next_period_goes_on() -> None:
    host = FakeKsm()
    control = KsmControl(host, P)
    control.step(0.5)
    host.unreadable = True
    control.step(0.05)
    assert control.errors == 1 and control.status().knobs is None
    host.unreadable = False
    control.step(0.05)
    assert control.mode is KsmMode.MANAGING and host.knobs_now.running


def test_off_and_missing_ksm_are_never_touched() -> None:
    host = FakeKsm(knobs_now=KsmKnobs(1, 100, 20))
    off = KsmControl(host, P, enabled=False)
    off.step(0.0)
    assert off.mode is KsmMode.OFF and off.status().knobs is None and host.written == []
    missing = KsmControl(FakeKsm(present=False), P)
    missing.step(0.0)
    assert missing.mode is KsmMode.UNAVAILABLE
    assert "no KSM" in (missing.status().reason or "")


def test_unknown_free_memory_leaves_the_knobs_as_they_are() -> None:
    host = FakeKsm()
    control = KsmControl(host, P)
    control.step(0.05)
    control.step(None)
    assert len(host.written) == 1 and host.knobs_now.running


def test_the_daemon_runs_ksm_on_the_hosts_count_and_shows_it(tmp_path: Path) -> None:
    # The balloons say 2 GiB of the 3 GiB budget is held (a third free), but the
    # QEMU processes hold 2.8 GiB: 200 MiB free by the host's count, below 20 %.
    vms = {"web": FakeVm(2 * GIB, 1 * GIB), "db": FakeVm(GIB, GIB)}
    counted = {
        1000: HostHeld(1800 * MIB, 1700 * MIB, ksm_merged_bytes=64 * MIB),
        1001: HostHeld(1000 * MIB, 950 * MIB),
    }
    ksm = FakeKsm(totals_now=KsmTotals(10, 90, 3, None))
    daemon = make(tmp_path, vms, budget="3GiB", memory_host=FakeMemoryHost(counted), ksm=ksm)
    daemon.step()
    status = daemon.status()
    assert status is not None and status.host.truth is not None
    assert status.host.truth.held_bytes == 2800 * MIB
    assert status.host.truth.free_bytes == 3 * GIB - 2800 * MIB
    assert status.ksm is not None and status.ksm.mode is KsmMode.MANAGING
    assert ksm.knobs_now.running
    assert status.ksm.totals == KsmTotals(10, 90, 3, None)
    assert status.counters[FailureCounter.KSM_ERRORS] == 0
    web = status.guest("web")
    assert web is not None and web.host is not None and web.host.ksm_merged_bytes == 64 * MIB
    daemon.close()
    assert ksm.knobs_now == FOUND  # put back as found


def test_the_daemon_leaves_ksm_off_when_told(tmp_path: Path) -> None:
    vms = {"web": FakeVm(2 * GIB, 2 * GIB)}
    ksm = FakeKsm()
    daemon = make(tmp_path, vms, budget="2GiB", ksm=ksm, ksm_table={"mode": "off"})
    for _ in range(3):
        daemon.step()
    status = daemon.status()
    assert status is not None and status.ksm is not None
    assert status.ksm.mode is KsmMode.OFF and ksm.written == []


def test_a_daemon_that_died_managing_ksm_is_taken_over_by_the_next(tmp_path: Path) -> None:
    host = FakeKsm(knobs_now=KsmKnobs(0, 64, 200))
    claim = KsmClaim(tmp_path / "ksm.json")
    first = KsmControl(host, P, claim=claim)
    first.step(0.05)  # starts KSM, and dies without closing
    assert host.knobs_now.running and claim.path.exists()
    second = KsmControl(host, P, claim=KsmClaim(tmp_path / "ksm.json"))
    second.step(0.5)
    assert second.mode is KsmMode.MANAGING and not host.knobs_now.running
    second.close()
    assert host.knobs_now == KsmKnobs(0, 64, 200)  # what the first found
    assert not claim.path.exists()


def test_a_daemon_that_hands_ksm_over_drops_its_claim(tmp_path: Path) -> None:
    host = FakeKsm()
    claim = KsmClaim(tmp_path / "ksm.json")
    control = KsmControl(host, P, claim=claim)
    control.step(0.05)
    assert claim.path.exists()
    host.knobs_now = KsmKnobs(1, 5000, 10)
    control.step(0.05)
    assert control.mode is KsmMode.LEFT_ALONE and not claim.path.exists()


def test_a_claim_whose_knobs_someone_changed_since_is_not_honoured(tmp_path: Path) -> None:
    host = FakeKsm()
    claim = KsmClaim(tmp_path / "ksm.json")
    KsmControl(host, P, claim=claim).step(0.05)  # dies managing
    host.knobs_now = KsmKnobs(1, 2000, 10)  # an administrator's, since
    second = KsmControl(host, P, claim=claim)
    second.step(0.9)
    assert second.mode is KsmMode.LEFT_ALONE and host.knobs_now == KsmKnobs(1, 2000, 10)
    assert not claim.path.exists()
    (tmp_path / "bad.json").write_text("{not json")
    assert KsmClaim(tmp_path / "bad.json").load() is None
