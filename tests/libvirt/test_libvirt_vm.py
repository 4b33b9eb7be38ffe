"""The daemon over libvirt domains, against a real libvirtd, with test guests under TCG
(``vm``).

Thresholds, as in ``tests/qemu/test_daemon_vm.py`` (the same guests and policy):
- MOVE_BYTES: 64 MiB moved from idle to busy, well above the pacing's 4 MiB noise.
- MOVE_DEADLINE_S: the QMP path moves that in about 15 s under TCG; 90 s, counted
  from the serial line that says the phase moving it began.
- GROW_S, SWAP_S: when the busy domain's work grows, and when the busy and idle
  domains swap their work (seconds on each guest's clock from its boot). GROW_S leaves
  the daemon, started once busy has booted (about 10 s, longer on a loaded host), time
  to balloon both down first; SWAP_S comes after the first move, which takes about
  15 s. Each phase is waited for by its serial line, for up to GUEST_CLOCK_SLOWDOWN
  times its time: the guest's clock falls behind the host's on a loaded host.
- JUMP_BYTES: after libvirtd restarts, a settled guest's balloon stays within this of
  where it was; the rate's smallest step is 16 MiB, so 32 MiB is two of them.
- TAKE_BYTES / AGENT_DEADLINE_S: 64 MiB of holes in the agent domain's RAM file, of
  the ~130 MiB a 256 MiB budget takes from a 384 MiB guest; as for the agent VMs
  ``vm start`` makes (``tests/qemu/test_daemon_agent_vm.py``), 120 s. By hand it took
  about 15 s.
- CPU_CHANGE_S: an agent reports a vCPU change within a second or two (as for the QEMU
  guests of ``tests/qemu/test_cpu_vm.py``); 30 s is room for a loaded host.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from balloonist.cli import main
from balloonist.daemon.agent_link import AgentPort
from balloonist.daemon.config import DaemonConfig
from balloonist.daemon.control import GuestChange
from balloonist.daemon.host_reclaim import SysCgroups
from balloonist.daemon.service import Daemon
from balloonist.libvirt.connection import Libvirt
from balloonist.libvirt.domain_xml import DomainSettings, parse_domain
from balloonist.libvirt.process import domain_pid, vcpu_threads
from balloonist.libvirt.source import LibvirtVms
from balloonist.qemu.assets import host_python
from balloonist.qemu.launcher import StateDir
from balloonist.units import MIB

from ..qemu.conftest import GUEST_CLOCK_SLOWDOWN, guest_status, stepper, work_phase_began
from ..waiting import wait_until
from .conftest import URI, DomainFactory, Libvirtd, virsh

pytestmark = pytest.mark.vm

MOVE_BYTES = 64 * MIB
MOVE_DEADLINE_S = 90.0
GROW_S = 60
SWAP_S = 150
MIN_BYTES = 128 * MIB
JUMP_BYTES = 32 * MIB
TAKE_BYTES = 64 * MIB
AGENT_DEADLINE_S = 120.0
CPU_CHANGE_S = 30.0


def actual_bytes(name: str) -> int:
    stats = dict(line.split() for line in virsh("dommemstat", name).splitlines() if line.strip())
    return int(stats["actual"]) * 1024


def libvirt_daemon(state: Path, budget: str, sent: list[tuple[str, int]]) -> Daemon:
    config = DaemonConfig.model_validate({"daemon": {"budget": budget}})
    return Daemon(
        config,
        StateDir(state),
        source=LibvirtVms(Libvirt(URI, events=True), config),
        on_target=lambda name, b: sent.append((name, b)),
    )


def manage(name: str, *flags: str) -> None:
    assert main(["libvirt", "--uri", URI, "manage", name, *flags]) == 0


def test_memory_moves_between_domains_and_the_daemon_rides_out_what_libvirt_does(
    domains: DomainFactory, libvirtd: Libvirtd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # busy grows at GROW_S; at SWAP_S busy goes idle and idle gets busy (each counted
    # from its own boot: busy boots last, so the daemon starts well before it grows)
    busy = domains.define("busy", work=f"50@0,380@{GROW_S},30@{SWAP_S}", start=False)
    idle = domains.define("idle", work=f"20@0,380@{SWAP_S}", start=False)
    bystander = domains.define("by", memory_mib=256, start=False)
    for domain in (idle, bystander, busy):
        domains.start(domain)
    manage(busy.name, "--min", "128MiB")
    manage(idle.name, "--min", "128MiB")
    sent: list[tuple[str, int]] = []
    daemon = libvirt_daemon(tmp_path, "800MiB", sent)
    run_until = stepper(daemon)
    try:
        # Only the opted-in domains; the budget is shared, both get ballooned down.
        assert run_until(lambda: actual_bytes(busy.name) < 480 * MIB, 30)
        assert daemon.hv.managed() == sorted([busy.name, idle.name])
        run_until(None, 3)

        def grown() -> bool:
            return work_phase_began(busy.lines(), 380)

        def swapped() -> bool:
            return work_phase_began(idle.lines(), 380) and work_phase_began(busy.lines(), 30)

        moves(run_until, busy.name, idle.name, grown, GROW_S)
        moves(run_until, idle.name, busy.name, swapped, SWAP_S)  # their work swaps
        assert sent and all(MIN_BYTES <= b <= 512 * MIB for _, b in sent)
        assert actual_bytes(bystander.name) == 256 * MIB  # never touched
        wait_settled(run_until, (busy.name, idle.name))

        # A domain started after the daemon is picked up within a period of its guest
        # loading the balloon driver (before, it is listed without one).
        late = domains.define(
            "late", memory_mib=256, settings=DomainSettings(managed=True), start=False
        )
        virsh("start", late.name)
        daemon.step()
        assert late.name not in daemon.hv.managed()  # still booting: no driver yet
        domains.wait_booted(late)
        assert run_until(lambda: late.name in daemon.hv.managed(), 2)

        # libvirtd restarts under the daemon: it reconnects and carries on, no jumps.
        # The late domain's share came from busy and idle: their balloons settle again
        # first, or a move it started would look like a jump (seen once in CI: busy
        # 51 MiB lower, 5 s after late joined).
        wait_settled(run_until, (busy.name, idle.name))
        before = {n: actual_bytes(n) for n in (busy.name, idle.name)}
        count = len(sent)
        libvirtd.restart()
        assert run_until(lambda: len(sent) > count or _all_sampled(daemon), 30)
        run_until(None, 3)
        for name, was in before.items():
            assert abs(actual_bytes(name) - was) <= JUMP_BYTES, (name, was, actual_bytes(name))

        # A domain destroyed mid-inflate is dropped; the others stay managed.
        daemon.change_guest(idle.name, GuestChange(max_bytes=MIN_BYTES))
        daemon.step()
        caplog.set_level(logging.INFO, logger="balloonist.daemon")
        virsh("destroy", idle.name)
        assert run_until(lambda: idle.name not in daemon.hv.managed(), 10)
        # libvirt's event says why it went
        assert run_until(lambda: f"{idle.name}: stopped: destroyed" in caplog.messages, 10)
        served = daemon.hv.view(busy.name)
        assert served is not None
        before_count = served.sent_count
        run_until(None, 2)
        assert busy.name in daemon.hv.managed()
        view = daemon.hv.view(busy.name)
        assert view is not None and view.sent_count >= before_count
    finally:
        daemon.close()


def moves(
    run_until: Callable[[Callable[[], bool] | None, float], bool],
    to: str,
    away_from: str,
    began: Callable[[], bool],
    at_s: float,
) -> None:
    """Run periods until the workload phase that should move memory has ``began`` (due
    at ``at_s`` on the guests' clocks), then until MOVE_BYTES went from ``away_from``'s
    balloon to ``to``'s."""
    gainer0, loser0 = actual_bytes(to), actual_bytes(away_from)
    phase_s = at_s * GUEST_CLOCK_SLOWDOWN
    assert run_until(began, phase_s), f"the phase moving memory to {to} not begun in {phase_s} s"
    moved = run_until(
        lambda: (
            actual_bytes(to) >= gainer0 + MOVE_BYTES
            and actual_bytes(away_from) <= loser0 - MOVE_BYTES
        ),
        MOVE_DEADLINE_S,
    )
    assert moved, (to, gainer0, actual_bytes(to), away_from, loser0, actual_bytes(away_from))


def wait_settled(
    run_until: Callable[[Callable[[], bool] | None, float], bool], names: tuple[str, ...]
) -> None:
    """Run periods until no balloon of ``names`` moved by over JUMP_BYTES / 4 in 3 s."""
    last = {n: actual_bytes(n) for n in names}

    def still() -> bool:
        run_until(None, 3)
        now = {n: actual_bytes(n) for n in names}
        quiet = all(abs(now[n] - last[n]) <= JUMP_BYTES // 4 for n in names)
        last.update(now)
        return quiet

    wait_until(still, MOVE_DEADLINE_S, "the balloons to settle")


def _all_sampled(daemon: Daemon) -> bool:
    return all(
        (view := daemon.hv.view(name)) is not None and view.actual_bytes is not None
        for name in daemon.hv.managed()
    )


def test_a_setting_changed_live_lands_in_the_domains_xml_and_outlives_the_daemon(
    domains: DomainFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    web = domains.define("web", settings=DomainSettings(managed=True, shares=2000))
    sent: list[tuple[str, int]] = []
    daemon = libvirt_daemon(tmp_path, "2GiB", sent)
    try:
        daemon.step()
        daemon.change_guest(web.name, GuestChange(min_bytes=300 * MIB))
        daemon.step()
        # At rest at its target (all of its 512 MiB), the balloon is moved behind
        # balloonist's back: libvirt's balloon-change events show it, and it is said.
        run_until = stepper(daemon)
        run_until(None, 3)
        caplog.set_level(logging.WARNING, logger="balloonist.daemon")
        virsh("setmem", web.name, "400M", "--live")
        assert run_until(
            lambda: any(f"{web.name}: its balloon moved to" in m for m in caplog.messages), 30
        ), caplog.messages
    finally:
        daemon.close()
    for flags in ((), ("--inactive",)):  # live and persistent
        settings = parse_domain(virsh("dumpxml", web.name, *flags)).settings
        assert settings == DomainSettings(True, 300 * MIB, None, 2000), flags
    again = libvirt_daemon(tmp_path / "fresh", "2GiB", sent)  # no state file to restore from
    try:
        again.step()
        (spec,) = again.backend.configured_specs()
        assert (spec.min_bytes, spec.shares) == (300 * MIB, 2000)
    finally:
        again.close()


def test_list_shows_each_domain_managed_or_why_not(
    domains: DomainFactory, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plain = domains.define("plain", memory_mib=256)
    nb = domains.define("nb", memory_mib=256, balloon="none")
    # a virtio balloon, but a guest kernel that never loads its driver
    nodriver = domains.define(
        "nodriver", memory_mib=256, kernel_args="module_blacklist=virtio_balloon"
    )
    manage(plain.name, "--max", "200MiB")
    manage(nodriver.name)
    capsys.readouterr()
    assert main(["libvirt", "--uri", URI, "list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows[plain.name].endswith("managed") and "200MiB" in rows[plain.name]
    assert "unmanaged: no usable balloon (<memballoon model='none'>)" in rows[nb.name]
    assert "unmanaged: no balloon driver in the guest" in rows[nodriver.name]
    assert main(["libvirt", "--uri", URI, "unmanage", plain.name]) == 0
    xml = virsh("dumpxml", "--inactive", plain.name)
    assert parse_domain(xml).settings == DomainSettings(False, None, 200 * MIB, None)
    # as a daemon that manages every domain with a balloon would
    host = tmp_path / "host.toml"
    host.write_text(f'[daemon]\nuri = "{URI}"\nmanage_all_domains = true\n')
    capsys.readouterr()
    assert main(["libvirt", "--config", str(host), "list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows[plain.name].endswith("managed") and "unmanaged" not in rows[plain.name]


def test_the_cpu_balloon_pins_a_domains_vcpus_where_virsh_shows_it(
    domains: DomainFactory,
) -> None:
    web = domains.define("pin", memory_mib=256)
    libvirt = Libvirt(URI)
    try:
        host = LibvirtVms(libvirt, DaemonConfig()).vcpu_host()
        pid = domain_pid(web.name)
        assert pid is not None
        threads = vcpu_threads(pid, 1)
        assert list(threads) == [0]
        assert host.cpu_s(web.name, pid, threads) > 0  # it booted
        host.narrow(web.name, pid, threads, frozenset({0}))
        assert virsh("vcpupin", web.name).split()[-1] == "0"
        host.narrow(web.name, pid, threads, frozenset({0, 1}))
        assert virsh("vcpupin", web.name).split()[-1] == "0-1"
    finally:
        libvirt.close()


def test_a_virtio_mem_domain_grows_and_shrinks_under_the_daemon(
    domains: DomainFactory, tmp_path: Path
) -> None:
    boot_mib, region_mib, lowered = 256, 512, 384 * MIB
    vmem = domains.define(
        "vmem",
        memory_mib=boot_mib,
        virtio_mem_mib=region_mib,
        settings=DomainSettings(managed=True),
    )
    sent: list[tuple[str, int]] = []
    daemon = libvirt_daemon(tmp_path, "2GiB", sent)

    def plugged_bytes() -> int:
        x = virsh("dumpxml", vmem.name)
        device = ET.fromstring(x).find("devices/memory[@model='virtio-mem']/target/current")
        assert device is not None and device.get("unit") == "KiB", x
        return int(device.text or "0") * 1024

    held: list[tuple[int, int]] = []  # after each period: targets sent so far, its size

    def plugged(wanted_bytes: int) -> Callable[[], bool]:
        def check() -> bool:
            held.append((len(sent), guest_status(daemon, vmem.name).allocated_bytes))
            return plugged_bytes() == wanted_bytes

        return check

    try:
        run_until = stepper(daemon)
        # The host has room: it is given all it may have, and plugs it.
        assert run_until(plugged(region_mib * MIB), 60), plugged_bytes()
        daemon.change_guest(vmem.name, GuestChange(max_bytes=lowered))
        changed = len(sent)
        assert run_until(plugged(lowered - boot_mib * MIB), 90), plugged_bytes()
    finally:
        daemon.close()
    targets = [b for name, b in sent if name == vmem.name]
    assert all(boot_mib * MIB <= t <= (boot_mib + region_mib) * MIB for t in targets), targets
    # Once its max is lowered, each target is a paced step down from where the guest
    # was in the period it was sent (the next step after a slow unplug is from where
    # the guest got to, so targets need not fall every period), never a plug; the
    # last is the max.
    after = [(b, next(size for count, size in held if count > i)) for i, (_, b) in enumerate(sent)]
    after = after[changed:]
    assert after and after[-1][0] == lowered
    assert all(lowered <= b <= size for b, size in after), (after, held)


def test_a_domain_s_own_memory_cgroup_is_the_one_host_paging_caps(
    domains: DomainFactory,
) -> None:
    web = domains.define("cg", memory_mib=256)
    libvirt = Libvirt(URI)
    try:
        config = DaemonConfig.model_validate({"daemon": {"manage_all_domains": True}})
        (record,) = [r for r in LibvirtVms(libvirt, config).records() if r.name == web.name]
    finally:
        libvirt.close()
    assert record.pid is not None and record.cgroup is None  # libvirt made it, not us
    cgroup = SysCgroups().cgroup(record)
    assert cgroup is not None, Path(f"/proc/{record.pid}/cgroup").read_text()
    assert "machine" in cgroup.name
    assert cgroup.usage_bytes() > 64 * MIB  # the guest booted in it
    cgroup.set_limit(None)  # writable: lifting a cap that is not there changes nothing


@pytest.mark.parametrize(
    ("argv", "what"),
    [
        (["--uri", "qemu+unix:///system?socket=/nonexistent", "list"], "cannot connect"),
        (["manage", "no-such-domain"], "no-such-domain: no such domain"),
        (["manage", "no-such-domain", "--min", "128"], "--min: size '128' has no unit"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    libvirtd: Libvirtd, argv: list[str], what: str, capsys: pytest.CaptureFixture[str]
) -> None:
    full = argv if argv[0] == "--uri" else ["--uri", URI, *argv]
    assert main(["libvirt", *full]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and what in err, err


@pytest.mark.parametrize("by", ["flag", "host.toml"])
def test_the_daemon_refuses_an_unreachable_libvirt(
    libvirtd: Libvirtd, tmp_path: Path, by: str
) -> None:
    uri = "qemu+unix:///system?socket=/nonexistent"
    if by == "flag":
        how = ["--libvirt", uri]
    else:
        (tmp_path / "host.toml").write_text(f'[daemon]\nbackend = "libvirt"\nuri = "{uri}"\n')
        how = ["--config", str(tmp_path / "host.toml")]
    argv = [sys.executable, "-m", "balloonist", "daemon", *how, "--no-api"]
    done = subprocess.run(
        [*argv, "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "cannot connect" in done.stderr


def test_an_agent_domain_prepared_by_balloonist_is_ballooned_by_its_agent(
    domains: DomainFactory, agent_pyz: Path, tmp_path: Path
) -> None:
    """The agent frees pages inside the guest and the host punches them out of the RAM
    file libvirt backs the guest with: the pages it reported are holes in that file.

    (Not the file's allocated total: with free page reporting on, the guest's free
    memory is already back with the host, and a balloon page the guest never touched
    was a hole before it too.)"""
    agent = domains.define(
        "agent", memory_mib=384, start=False, run=(host_python(), str(agent_pyz))
    )
    assert main(["libvirt", "--uri", URI, "prepare", agent.name, "--agent", "--apply"]) == 0
    manage(agent.name, "--min", "128MiB")
    domains.start(agent)
    wait_until(
        lambda: any("balloonist-agent: " in line for line in agent.lines()),
        60,
        "the agent to start in the guest",
    )
    sent: list[tuple[str, int]] = []
    daemon = libvirt_daemon(tmp_path, "256MiB", sent)
    run_until = stepper(daemon)
    try:
        assert run_until(lambda: daemon.hv.view(agent.name) is not None, 5)
        (record,) = daemon.hv.records()
        assert record.ram_file is not None and record.agent_socket is not None

        def freed_bytes() -> int:
            view = daemon.hv.view(agent.name)
            assert view is not None and isinstance(view.port, AgentPort)
            return view.port.session.verified_freed_pages() * 4096

        assert run_until(lambda: freed_bytes() >= TAKE_BYTES, AGENT_DEADLINE_S), freed_bytes()
        view = daemon.hv.view(agent.name)
        assert view is not None and isinstance(view.port, AgentPort) and view.port.cooperative
        assert view.actual_bytes is not None and view.actual_bytes <= 384 * MIB - TAKE_BYTES
        assert sent and all(MIN_BYTES <= b <= 384 * MIB for _, b in sent)
    finally:
        daemon.close()


def vcpu_pins(name: str) -> dict[int, str]:
    """``virsh vcpupin``: vCPU -> the host processors its thread may run on."""
    rows = [line.split() for line in virsh("vcpupin", name).splitlines()]
    return {int(r[0]): r[1] for r in rows if len(r) == 2 and r[0].isdigit()}


def test_an_agent_domain_s_cpu_balloon_follows_the_policy_through_libvirt(
    domains: DomainFactory, agent_pyz: Path, tmp_path: Path
) -> None:
    """A 2-vCPU domain prepared with ``--cpus``, the daemon sharing processors 0-1: a
    live ``max_cpus`` of 1 has its agent take a vCPU offline (the agent's report) and
    both vCPU threads pinned to processor 0 through libvirt (``virsh vcpupin``);
    ``max_cpus`` 2 gives both back."""
    dom = domains.define(
        "cpus", memory_mib=384, vcpus=2, start=False, run=(host_python(), str(agent_pyz))
    )
    assert main(["libvirt", "--uri", URI, "prepare", dom.name, "--cpus", "--apply"]) == 0
    manage(dom.name)
    domains.start(dom)
    wait_until(
        lambda: any("balloonist-agent: " in line for line in dom.lines()),
        60,
        "the agent to start in the guest",
    )
    config = DaemonConfig.model_validate({"daemon": {"budget": "1GiB", "processors": "0-1"}})
    daemon = Daemon(
        config, StateDir(tmp_path), source=LibvirtVms(Libvirt(URI, events=True), config)
    )
    run_until = stepper(daemon)

    def online() -> int | None:
        status = daemon.status()
        guest = status.guest(dom.name) if status is not None else None
        return None if guest is None or guest.cpu is None else guest.cpu.online_vcpus

    try:
        assert run_until(lambda: online() == 2, AGENT_DEADLINE_S), online()
        assert run_until(lambda: vcpu_pins(dom.name) == {0: "0-1", 1: "0-1"}, CPU_CHANGE_S)
        daemon.change_guest(dom.name, GuestChange(max_cpus=1))
        assert run_until(
            lambda: online() == 1 and vcpu_pins(dom.name) == {0: "0", 1: "0"}, CPU_CHANGE_S
        ), (online(), vcpu_pins(dom.name))
        daemon.change_guest(dom.name, GuestChange(max_cpus=2))
        assert run_until(
            lambda: online() == 2 and vcpu_pins(dom.name) == {0: "0-1", 1: "0-1"}, CPU_CHANGE_S
        ), (online(), vcpu_pins(dom.name))
    finally:
        daemon.close()
