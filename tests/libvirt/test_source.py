"""libvirt domains as the daemon's VMs, over a fake of the libvirt module: which are
managed and with what settings, the balloon port, the connection riding over a
libvirtd restart, and the whole daemon on top."""

from __future__ import annotations

import asyncio
import itertools
import logging
from pathlib import Path

import pytest

from balloonist.daemon.config import DaemonConfig
from balloonist.daemon.control import GuestChange
from balloonist.daemon.service import Daemon
from balloonist.errors import ConfigError
from balloonist.host import HostMemInfo
from balloonist.libvirt.connection import LibvirtError
from balloonist.libvirt.domain_xml import DomainFacts, DomainSettings
from balloonist.libvirt.events import MAX_BALLOON_MOVES, MAX_PENDING, DomainEvents, lifecycle_words
from balloonist.libvirt.metadata import read_settings, write_settings
from balloonist.libvirt.port import DomainBalloon, DomainVirtioMem, guest_stats_from
from balloonist.libvirt.source import LibvirtVms, domain_record
from balloonist.qemu.launcher import StateDir
from balloonist.units import GIB, KIB, MIB

from .fakes import (
    VIR_DOMAIN_AFFECT_CONFIG,
    VIR_DOMAIN_AFFECT_LIVE,
    VIR_DOMAIN_EVENT_DEFINED,
    VIR_DOMAIN_EVENT_STARTED,
    VIR_DOMAIN_EVENT_STOPPED,
    VIR_DOMAIN_EVENT_STOPPED_CRASHED,
    VIR_DOMAIN_EVENT_SUSPENDED,
    FakeDomain,
    fake_libvirt,
)

GIB_KIB = GIB // KIB


def opted_in(name: str, memory_kib: int = GIB_KIB, **settings: int) -> FakeDomain:
    xml = DomainSettings(managed=True, **settings).to_xml()
    return FakeDomain(
        name,
        memory_kib,
        metadata_xml={VIR_DOMAIN_AFFECT_LIVE: xml, VIR_DOMAIN_AFFECT_CONFIG: xml},
    )


def config(**daemon: object) -> DaemonConfig:
    return DaemonConfig.model_validate({"daemon": daemon})


def test_only_opted_in_domains_with_a_balloon_are_managed() -> None:
    libvirt, _ = fake_libvirt(
        opted_in("web"),
        FakeDomain("plain", GIB_KIB),
        FakeDomain("nb", GIB_KIB, balloon="none"),
        FakeDomain("off", GIB_KIB, active=False),
    )
    vms = LibvirtVms(libvirt, config())
    assert [r.name for r in vms.records()] == ["web"]
    reasons = {d.facts.name: d.reason for d in vms.domains() if not d.managed}
    assert reasons == {
        "nb": "no usable balloon (<memballoon model='none'>)",
        "plain": "not opted in (balloonist libvirt manage plain)",
    }
    # every domain with a balloon, when the host says so
    everything = LibvirtVms(libvirt, config(manage_all_domains=True))
    assert [r.name for r in everything.records()] == ["plain", "web"]


def test_a_domain_whose_guest_has_no_balloon_driver_is_unmanaged_until_it_reports() -> None:
    booting = opted_in("booting")
    booting.last_update = 0
    unknown = opted_in("unknown")
    unknown.last_update = None  # a libvirt that gives no stamp cannot tell: managed
    libvirt, _ = fake_libvirt(booting, unknown, opted_in("web"))
    vms = LibvirtVms(libvirt, config())
    assert [r.name for r in vms.records()] == ["unknown", "web"]
    reasons = {d.facts.name: d.reason for d in vms.domains() if not d.managed}
    assert reasons == {"booting": "no balloon driver in the guest (it has sent no statistics)"}
    booting.last_update = 1700000000  # its driver loaded
    asked = booting.stats_calls
    assert [r.name for r in vms.records()] == ["booting", "unknown", "web"]
    vms.records()
    assert booting.stats_calls == asked + 1  # once seen, not asked again


def test_settings_come_from_the_metadata_then_host_toml_then_the_defaults() -> None:
    libvirt, _ = fake_libvirt(opted_in("web", min_bytes=256 * MIB), opted_in("db"))
    host = DaemonConfig.model_validate(
        {"vms": {"web": {"min": "128MiB", "max": "768MiB"}, "db": {"shares": 3000}}}
    )
    records = {r.name: r for r in LibvirtVms(libvirt, host).records()}
    web, db = records["web"], records["db"]
    assert (web.memory_bytes, web.min_bytes, web.max_bytes, web.shares) == (
        GIB,
        256 * MIB,  # the domain's own metadata wins
        768 * MIB,  # host.toml fills what the metadata does not set
        1000,
    )
    assert (db.min_bytes, db.max_bytes, db.shares) == (0, GIB, 3000)


def test_a_domain_whose_settings_do_not_fit_is_left_out_not_an_error() -> None:
    libvirt, _ = fake_libvirt(opted_in("big", max_bytes=2 * GIB), opted_in("ok"))
    assert [r.name for r in LibvirtVms(libvirt, config()).records()] == ["ok"]


def test_while_libvirtd_is_away_the_domains_known_stay_managed() -> None:
    libvirt, lib = fake_libvirt(opted_in("web"))
    vms = LibvirtVms(libvirt, config())
    assert [r.name for r in vms.records()] == ["web"]
    lib.restart()
    lib.reachable = False
    assert [r.name for r in vms.records()] == ["web"]
    lib.reachable = True
    lib.domains["db"] = opted_in("db")
    assert [r.name for r in vms.records()] == ["db", "web"]
    assert libvirt.reconnects == 1


def test_the_port_moves_the_balloon_live_and_reads_libvirts_statistics() -> None:
    libvirt, lib = fake_libvirt(opted_in("web"))
    port = DomainBalloon(libvirt, "web")

    async def run() -> None:
        await port.connect()
        await port.enable_stats(1)
        await port.set_target(600 * MIB)
        assert await port.actual_bytes() == 600 * MIB
        stats = await port.guest_stats()
        assert stats.available_bytes == 400 * MIB
        assert stats.major_faults == 7
        assert stats.swap_in_pages == 2
        assert stats.last_update_s == 1234 + lib.domains["web"].stats_calls  # a new report
        await port.guest_stats()  # no reply left to share: asks again

    asyncio.run(run())
    assert lib.domains["web"].targets_kib == [600 * 1024]
    # connect; actual_bytes and the guest_stats after it share one call; the last one
    assert lib.domains["web"].stats_calls == 3
    assert lib.domains["web"].stats_period_s == 1


def test_a_domain_gone_from_under_the_port_is_a_transient_failure() -> None:
    libvirt, lib = fake_libvirt(opted_in("web"))
    port = DomainBalloon(libvirt, "web")
    del lib.domains["web"]
    with pytest.raises(LibvirtError) as caught:
        asyncio.run(port.actual_bytes())
    assert caught.value.no_domain and caught.value.domain == "web"


def test_guest_statistics_that_make_no_sense_are_dropped() -> None:
    stats = guest_stats_from(
        {"usable": -5, "unused": "lots", "major_fault": True, "available": 2**45, "actual": 1}
    )
    assert (stats.available_bytes, stats.free_bytes, stats.major_faults) == (None, None, None)
    assert stats.total_bytes is None  # 2**45 KiB: beyond the largest figure a guest may give
    assert stats.last_update_s == 0


def test_a_change_is_written_live_and_persistent_and_keeps_the_rest() -> None:
    libvirt, lib = fake_libvirt(opted_in("web", shares=2000))
    vms = LibvirtVms(libvirt, config())
    vms.save_change("web", GuestChange(min_bytes=300 * MIB, max_cpus=2), None)
    web = lib.domains["web"]
    assert web.metadata_xml[VIR_DOMAIN_AFFECT_LIVE] == web.metadata_xml[VIR_DOMAIN_AFFECT_CONFIG]
    assert read_settings(libvirt, "web") == DomainSettings(
        True, min_bytes=300 * MIB, shares=2000, max_cpus=2
    )
    (record,) = vms.records()
    assert (record.min_bytes, record.shares, record.max_cpus) == (300 * MIB, 2000, 2)


def test_a_transient_domain_gets_its_settings_live_only() -> None:
    libvirt, lib = fake_libvirt(FakeDomain("tmp", GIB_KIB, persistent=False))
    write_settings(libvirt, "tmp", lambda s: DomainSettings(managed=True))
    assert list(lib.domains["tmp"].metadata_xml) == [VIR_DOMAIN_AFFECT_LIVE]
    assert read_settings(libvirt, "tmp").managed


def test_bad_metadata_is_a_config_error_naming_the_domain() -> None:
    libvirt, lib = fake_libvirt(opted_in("web"))
    lib.domains["web"].metadata_xml[VIR_DOMAIN_AFFECT_CONFIG] = "<settings shares='x'/>"
    with pytest.raises(ConfigError, match="web: metadata shares"):
        read_settings(libvirt, "web")


def test_the_daemon_shares_memory_among_domains_and_a_destroyed_one_is_dropped(
    tmp_path: Path,
) -> None:
    libvirt, lib = fake_libvirt(
        opted_in("a", 2 * GIB_KIB, min_bytes=512 * MIB), opted_in("b", 2 * GIB_KIB)
    )
    host = HostMemInfo(8 * GIB, 6 * GIB, 0, 0)
    cfg = config(budget="2GiB")
    ticks = itertools.count()
    daemon = Daemon(
        cfg,
        StateDir(tmp_path),
        clock=lambda: float(next(ticks)),
        meminfo=lambda: host,
        source=LibvirtVms(libvirt, cfg),
    )
    try:
        for _ in range(40):
            daemon.step()
        a, b = lib.domains["a"], lib.domains["b"]
        assert a.targets_kib and b.targets_kib
        assert all(t * KIB >= 512 * MIB for t in a.targets_kib)  # never below its min
        assert (a.actual_kib or 0) + (b.actual_kib or 0) <= 2 * GIB_KIB + 64 * 1024
        assert daemon.backend.kind == "libvirt"
        b.active = False  # virsh destroy b
        daemon.step()
        daemon.step()
        assert daemon.hv.managed() == ["a"]
        daemon.step()
    finally:
        daemon.close()


def test_without_libvirt_python_the_daemon_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    from balloonist.cli import main

    monkeypatch.setitem(sys.modules, "libvirt", None)  # import libvirt: ImportError
    assert main(["daemon", "--libvirt", "--state-dir", str(tmp_path), "--no-api"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "pip install 'balloonist[libvirt]'" in err


def test_a_simulated_host_has_no_libvirt(tmp_path: Path) -> None:
    from balloonist.cli import main

    assert main(["daemon", "--sim", "--libvirt", "--state-dir", str(tmp_path)]) == 2


def test_the_cpu_balloon_pins_vcpus_through_libvirt() -> None:
    libvirt, lib = fake_libvirt(opted_in("web"))
    host = LibvirtVms(libvirt, config()).vcpu_host()
    host.narrow("web", 1, {0: 11, 1: 12}, frozenset({1, 2}))
    web = lib.domains["web"]
    assert web.pins == {0: (False, True, True, False), 1: (False, True, True, False)}


def test_lifecycle_events_in_words() -> None:
    _, lib = fake_libvirt()
    assert lifecycle_words(lib, VIR_DOMAIN_EVENT_STOPPED, 2) == "stopped: crashed"
    assert lifecycle_words(lib, VIR_DOMAIN_EVENT_STARTED, 1) == "started: migrated in"
    assert lifecycle_words(lib, VIR_DOMAIN_EVENT_STARTED, 0) == "started"
    assert lifecycle_words(lib, VIR_DOMAIN_EVENT_DEFINED, 9) == "defined"
    assert lifecycle_words(lib, VIR_DOMAIN_EVENT_SUSPENDED, 0) is None


def test_the_source_logs_why_a_domain_came_or_went(caplog: pytest.LogCaptureFixture) -> None:
    libvirt, lib = fake_libvirt(opted_in("web"), events=True)
    vms = LibvirtVms(libvirt, config())
    assert [r.name for r in vms.records()] == ["web"]  # opens the connection: subscribed
    assert lib.event_loop_runs.wait(5)
    lib.domains["web"].active = False
    lib.fire("web", VIR_DOMAIN_EVENT_STOPPED, VIR_DOMAIN_EVENT_STOPPED_CRASHED)
    with caplog.at_level(logging.INFO, logger="balloonist.daemon"):
        assert vms.records() == []
    assert "web: stopped: crashed" in caplog.messages


def test_a_storm_of_events_is_bounded() -> None:
    events = DomainEvents()
    for i in range(MAX_PENDING + 10):
        events.lifecycle(f"d{i}", "defined")
    taken = events.take()
    assert len(taken) == MAX_PENDING and events.dropped == 10
    assert taken[-1] == (f"d{MAX_PENDING + 9}", "defined") and events.take() == []


def test_a_bad_host_toml_is_refused_before_libvirt_is_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from balloonist.cli import main

    bad = tmp_path / "host.toml"
    bad.write_text("[daemon]\nmanage_all_domains = 3\n")
    assert main(["libvirt", "--config", str(bad), "list"]) == 2
    assert "manage_all_domains" in capsys.readouterr().err


def test_a_balloon_moved_away_from_its_target_by_someone_else_is_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    libvirt, lib = fake_libvirt(opted_in("web"), events=True)
    port = DomainBalloon(libvirt, "web")

    async def run() -> None:
        await port.connect()  # opens the connection: subscribed
        await port.set_target(600 * MIB)
        # on its way down, then at rest at the target: all balloonist's doing
        lib.balloon_moves("web", 900 * 1024, 700 * 1024, 601 * 1024)
        await port.actual_bytes()
        assert port.moved_elsewhere == 0
        # virsh setmem 800M: away from the target, in two events; said once
        lib.balloon_moves("web", 700 * 1024, 800 * 1024)
        await port.actual_bytes()
        assert port.moved_elsewhere == 1
        # back at the target, then away again: a second time
        lib.balloon_moves("web", 600 * 1024, 650 * 1024)
        await port.actual_bytes()
        assert port.moved_elsewhere == 2
        # a new target: moves towards it, from wherever, are balloonist's
        await port.set_target(300 * MIB)
        lib.balloon_moves("web", 500 * 1024, 300 * 1024)
        await port.actual_bytes()
        assert port.moved_elsewhere == 2
        # a balloon that never had to move sends no event: two reads at the target
        # say it is at rest there
        await port.set_target(200 * MIB)
        lib.domains["web"].actual_kib = 200 * 1024
        await port.actual_bytes()
        lib.balloon_moves("web", 250 * 1024)  # one read is not enough
        await port.actual_bytes()
        assert port.moved_elsewhere == 2
        await port.actual_bytes()
        await port.actual_bytes()
        lib.balloon_moves("web", 250 * 1024)
        await port.actual_bytes()
        assert port.moved_elsewhere == 3

    with caplog.at_level(logging.WARNING, logger="balloonist.daemon"):
        asyncio.run(run())
    said = [m for m in caplog.messages if "by someone else" in m]
    assert len(said) == 3 and said[0].startswith("web: its balloon moved to 700MiB"), said


def test_balloon_moves_are_bounded_per_domain_and_in_domains() -> None:
    events = DomainEvents()
    for kib in range(MAX_BALLOON_MOVES + 5):
        events.balloon("web", kib)
    assert events.balloon_moves("web") == list(range(5, MAX_BALLOON_MOVES + 5))
    assert events.balloon_moves("web") == [] and events.dropped == 5
    for i in range(MAX_PENDING + 1):
        events.balloon(f"d{i}", 1)
    assert events.dropped == 6


def test_a_virtio_mem_domain_is_resized_through_its_device_never_below_boot_memory() -> None:
    facts = DomainFacts(
        name="vmem",
        memory_bytes=768 * MIB,  # <memory>: boot memory and the device together
        vcpus=1,
        balloon_model="virtio",
        stats_period_s=1,
        agent_socket=None,
        settings=DomainSettings(managed=True, min_bytes=128 * MIB),
        virtio_mem_bytes=512 * MIB,
    )
    record = domain_record(facts, config())
    assert record.virtio_mem_bytes == 512 * MIB
    assert (record.min_bytes, record.max_bytes) == (256 * MIB, 768 * MIB)
    libvirt, _ = fake_libvirt()
    port = LibvirtVms(libvirt, config()).port(record, lambda: 0.0)
    assert isinstance(port, DomainVirtioMem) and port.region_bytes == 512 * MIB
