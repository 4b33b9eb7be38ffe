"""The daemon driving real VMs' processors, over fake agent ports and a fake host side
of their vCPU threads (their CPU time and affinity): the CPU balloon targets follow the
policy, the threads' affinity follows the grants, in the order that never squeezes
online vCPUs, and their demand comes from the threads' CPU time. No QEMU
(tests/qemu/test_cpu_vm.py drives the same pieces in a real guest); the real host side
is checked against this process's own threads at the end."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from balloonist.daemon.agent_link import CpuReport
from balloonist.daemon.control import GuestChange
from balloonist.daemon.processors import grants
from balloonist.daemon.service import Daemon, DaemonConfig
from balloonist.daemon.vm_ports import CpuBalloonPort, ProcVcpuHost
from balloonist.qemu.launcher import StateDir
from balloonist.units import GIB
from tests.daemon.fakes import HOST, FakeVm, record

#: Host processors the VMs share.
PROCESSORS = frozenset({0, 1})
#: Seconds between periods on the fake clock.
PERIOD_S = 1.0


@dataclass
class FakeHost:
    """The host side of the fake VMs' vCPU threads: ``busy`` threads run all the time,
    the others never; affinities are remembered, not set."""

    now_s: float = 0.0
    busy: set[int] = field(default_factory=set)
    affinity: dict[int, frozenset[int]] = field(default_factory=dict)

    def clock(self) -> float:
        return self.now_s

    def cpu_s(self, name: str, pid: int, threads: Mapping[int, int]) -> float:
        return sum(self.now_s for tid in set(threads.values()) if tid in self.busy)

    def narrow(
        self, name: str, pid: int, threads: Mapping[int, int], processors: frozenset[int]
    ) -> None:
        for tid in threads.values():
            self.affinity[tid] = processors


@dataclass
class FakeAgentVm(FakeVm):
    """A memory FakeVm with a CPU balloon: its agent obeys a target at once."""

    host: FakeHost | None = None
    threads: tuple[int, ...] = ()
    vcpus: int = 2
    cpu_targets: list[int] = field(default_factory=list)
    #: The threads' affinity when each target arrived (to check the order of moves).
    affinity_at_target: list[frozenset[int]] = field(default_factory=list)
    report: CpuReport | None = None

    @property
    def cpu_balloon(self) -> FakeAgentVm:
        return self

    @property
    def cpu_report(self) -> CpuReport | None:
        return self.report

    async def set_cpu_target(self, reserved_vcpus: int) -> None:
        assert self.host is not None
        self.cpu_targets.append(reserved_vcpus)
        self.affinity_at_target.append(self.host.affinity.get(self.threads[0], PROCESSORS))
        online = tuple(range(self.vcpus - reserved_vcpus))
        reserved = tuple(range(self.vcpus - reserved_vcpus, self.vcpus))
        self.report = CpuReport(online, reserved, self.host.now_s)

    async def vcpu_threads(self) -> dict[int, int]:
        return dict(enumerate(self.threads))


@pytest.fixture
def host() -> FakeHost:
    return FakeHost(busy={101, 102})


@pytest.fixture
def vms(host: FakeHost) -> dict[str, FakeAgentVm]:
    return {
        "busy": FakeAgentVm(2 * GIB, 2 * GIB, host=host, threads=(101, 102)),
        "idle": FakeAgentVm(2 * GIB, 2 * GIB, host=host, threads=(201, 202)),
    }


def daemon_for(tmp_path: Path, vms: dict[str, FakeAgentVm], host: FakeHost) -> Daemon:
    state = StateDir(tmp_path)
    for name, vm in vms.items():
        agent_vm = replace(
            record(name, vm.memory),
            agent_socket=f"/nonexistent/{name}.sock",
            ram_file=f"/nonexistent/{name}.ram",
            cpus=vm.vcpus,
            pid=os.getpid(),
        )
        state.save(agent_vm)
    config = DaemonConfig.model_validate({"daemon": {"budget": "4GiB", "processors": "0-1"}})
    return Daemon(
        config,
        state,
        clock=host.clock,
        meminfo=lambda: HOST,
        connector=lambda r: vms[r.name],
        vcpu_host=host,
    )


def affinity(vm: FakeAgentVm, host: FakeHost) -> set[frozenset[int]]:
    return {host.affinity.get(tid, PROCESSORS) for tid in vm.threads}


def test_the_fake_is_a_cpu_balloon_port() -> None:
    assert isinstance(FakeAgentVm(GIB, GIB), CpuBalloonPort)


def test_each_vm_gets_its_own_processor_and_gives_it_back_in_order(
    tmp_path: Path, vms: dict[str, FakeAgentVm], host: FakeHost
) -> None:
    daemon = daemon_for(tmp_path, vms, host)
    try:
        for _ in range(3):
            daemon.step()
            host.now_s += PERIOD_S  # busy's threads run the whole period, idle's never
        daemon.step()
        status = daemon.status()
        assert status is not None and status.host.cpus == 2
        busy, idle = status.guest("busy"), status.guest("idle")
        assert busy is not None and busy.cpu is not None and idle is not None
        assert idle.cpu is not None
        # demand from the threads' CPU time: busy's run, idle's do not
        assert busy.cpu.demand_vcpus > 0.5 and idle.cpu.demand_vcpus < 0.2
        # two processors, a reservation of one each: one processor, one vCPU each
        assert (busy.cpu.allocation_target_cpus, idle.cpu.allocation_target_cpus) == (1, 1)
        assert vms["busy"].cpu_targets[-1] == 1 and vms["idle"].cpu_targets[-1] == 1
        assert (busy.cpu.online_vcpus, idle.cpu.online_vcpus) == (1, 1)
        # the threads were narrowed only after the guests had taken a vCPU offline,
        # and each VM has a processor of its own
        assert vms["busy"].affinity_at_target[0] == PROCESSORS
        assert affinity(vms["busy"], host) == {frozenset({0})}
        assert affinity(vms["idle"], host) == {frozenset({1})}

        # busy reserves both processors: the reservations no longer fit, so both VMs
        # may use both and the host time-slices; busy's threads are widened first
        daemon.change_guest("busy", GuestChange(min_cpus=2))
        daemon.step()
        assert vms["busy"].cpu_targets[-1] == 0
        assert vms["busy"].affinity_at_target[-1] == PROCESSORS  # room before the vCPU
        assert affinity(vms["busy"], host) == {PROCESSORS} == affinity(vms["idle"], host)
    finally:
        daemon.close()


def test_the_real_vcpu_host_reads_and_narrows_this_process_s_threads() -> None:
    stop = threading.Event()
    ids: list[int] = []
    started = threading.Event()

    def spin() -> None:
        ids.append(threading.get_native_id())
        started.set()
        while not stop.is_set():
            pass

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    started.wait()
    real, pid, threads = ProcVcpuHost(), os.getpid(), {0: ids[0]}
    every = frozenset(os.sched_getaffinity(ids[0]))
    try:
        first = real.cpu_s("me", pid, threads)
        deadline = time.monotonic() + 30
        while real.cpu_s("me", pid, threads) < first + 0.05:  # the spinning thread's time grows
            assert time.monotonic() < deadline, "the thread's CPU time never grew"
            stop.wait(0.01)
        one = frozenset({min(every)})
        real.narrow("me", pid, threads, one)
        assert frozenset(os.sched_getaffinity(ids[0])) == one
        real.narrow("me", pid, threads, every)
        assert frozenset(os.sched_getaffinity(ids[0])) == every
    finally:
        stop.set()
        thread.join()


def test_grants_are_disjoint_blocks_in_name_order_or_everything() -> None:
    processors = (2, 3, 4, 5)
    assert grants({"b": 1, "a": 2}, processors) == {
        "a": frozenset({2, 3}),
        "b": frozenset({4}),
    }
    assert grants({"a": 3, "b": 2}, processors) == {"a": frozenset(processors)} | {
        "b": frozenset(processors)
    }


def test_without_processors_the_daemon_leaves_them_alone(
    tmp_path: Path, vms: dict[str, FakeAgentVm], host: FakeHost
) -> None:
    state = StateDir(tmp_path)
    for name in vms:
        state.save(replace(record(name), agent_socket="/x", ram_file="/y", cpus=2, pid=1))
    daemon = Daemon(
        DaemonConfig.model_validate({"daemon": {"budget": "4GiB"}}),
        state,
        clock=host.clock,
        meminfo=lambda: HOST,
        connector=lambda r: vms[r.name],
        vcpu_host=host,
    )
    try:
        daemon.step()
        status = daemon.status()
        assert status is not None and status.host.cpus is None
        assert all(g.cpu is None for g in status.guests)
        assert all(vm.cpu_targets == [] for vm in vms.values())
    finally:
        daemon.close()


def test_a_processor_list_is_linux_s_cpu_list_format() -> None:
    from balloonist.daemon.config import parse_cpu_list

    assert parse_cpu_list("0-3,6") == (0, 1, 2, 3, 6)
    assert parse_cpu_list(" 5 , 2-3,3") == (2, 3, 5)
    for bad in ("", "x", "3-1", "0-8192", "1,,2"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)
