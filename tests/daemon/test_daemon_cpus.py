"""The daemon driving real VMs' processors, over fake agent ports whose "vCPU threads"
are real threads of this test process: the CPU balloon targets follow the policy, the
threads' affinity follows the grants, in the order that never squeezes online vCPUs,
and their demand comes from the threads' CPU time. No QEMU (tests/qemu/test_cpu_vm.py
drives the same pieces in a real guest)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from balloonist.daemon.agent_link import CpuReport
from balloonist.daemon.control import GuestChange
from balloonist.daemon.processors import grants
from balloonist.daemon.qemu_hv import CpuBalloonPort
from balloonist.daemon.service import Daemon, DaemonConfig
from balloonist.qemu.launcher import StateDir
from balloonist.units import GIB
from tests.daemon.fakes import HOST, FakeVm, record

#: Host processors the VMs share: this machine has (at least) two.
PROCESSORS = frozenset({0, 1})


class Threads:
    """Two threads standing in for a VM's vCPU threads; ``busy`` ones spin."""

    def __init__(self, *, busy: bool) -> None:
        self._stop = threading.Event()
        self.ids: list[int] = []
        started = threading.Barrier(3)

        def run() -> None:
            self.ids.append(threading.get_native_id())
            started.wait()
            while not self._stop.is_set():
                if not busy:
                    self._stop.wait(0.05)

        self._threads = [threading.Thread(target=run, daemon=True) for _ in range(2)]
        for t in self._threads:
            t.start()
        started.wait()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


@dataclass
class FakeAgentVm(FakeVm):
    """A memory FakeVm with a CPU balloon: its agent obeys a target at once."""

    threads: Threads | None = None
    vcpus: int = 2
    cpu_targets: list[int] = field(default_factory=list)
    #: The threads' affinity when each target arrived (to check the order of moves).
    affinity_at_target: list[frozenset[int]] = field(default_factory=list)
    report: CpuReport | None = None

    @property
    def cpu_report(self) -> CpuReport | None:
        return self.report

    async def set_cpu_target(self, reserved_vcpus: int) -> None:
        assert self.threads is not None
        self.cpu_targets.append(reserved_vcpus)
        self.affinity_at_target.append(frozenset(os.sched_getaffinity(self.threads.ids[0])))
        online = tuple(range(self.vcpus - reserved_vcpus))
        reserved = tuple(range(self.vcpus - reserved_vcpus, self.vcpus))
        self.report = CpuReport(online, reserved, time.monotonic())

    async def vcpu_threads(self) -> dict[int, int]:
        assert self.threads is not None
        return dict(enumerate(self.threads.ids))


@pytest.fixture
def vms() -> Iterator[dict[str, FakeAgentVm]]:
    made = {
        "busy": FakeAgentVm(2 * GIB, 2 * GIB, threads=Threads(busy=True)),
        "idle": FakeAgentVm(2 * GIB, 2 * GIB, threads=Threads(busy=False)),
    }
    yield made
    for vm in made.values():
        assert vm.threads is not None
        vm.threads.stop()


def daemon_for(tmp_path: Path, vms: dict[str, FakeAgentVm]) -> Daemon:
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
        clock=time.monotonic,
        meminfo=lambda: HOST,
        connector=lambda r: vms[r.name],
    )


def affinity(vm: FakeAgentVm) -> set[frozenset[int]]:
    assert vm.threads is not None
    return {frozenset(os.sched_getaffinity(tid)) for tid in vm.threads.ids}


def test_the_fake_is_a_cpu_balloon_port() -> None:
    assert isinstance(FakeAgentVm(GIB, GIB), CpuBalloonPort)


def test_each_vm_gets_its_own_processor_and_gives_it_back_in_order(
    tmp_path: Path, vms: dict[str, FakeAgentVm]
) -> None:
    daemon = daemon_for(tmp_path, vms)
    try:
        for _ in range(3):
            daemon.step()
            time.sleep(0.2)  # let the threads run, so the next sample measures them
        status = daemon.status()
        assert status is not None and status.host.cpus == 2
        busy, idle = status.guest("busy"), status.guest("idle")
        assert busy is not None and busy.cpu is not None and idle is not None
        assert idle.cpu is not None
        # demand from the threads' CPU time: busy spins, idle sleeps
        assert busy.cpu.demand_vcpus > 0.5 and idle.cpu.demand_vcpus < 0.2
        # two processors, a reservation of one each: one processor, one vCPU each
        assert (busy.cpu.allocation_target_cpus, idle.cpu.allocation_target_cpus) == (1, 1)
        assert vms["busy"].cpu_targets[-1] == 1 and vms["idle"].cpu_targets[-1] == 1
        assert (busy.cpu.online_vcpus, idle.cpu.online_vcpus) == (1, 1)
        # the threads were narrowed only after the guests had taken a vCPU offline,
        # and each VM has a processor of its own
        assert vms["busy"].affinity_at_target[0] == PROCESSORS
        assert affinity(vms["busy"]) == {frozenset({0})}
        assert affinity(vms["idle"]) == {frozenset({1})}

        # busy reserves both processors: the reservations no longer fit, so both VMs
        # may use both and the host time-slices; busy's threads are widened first
        daemon.change_guest("busy", GuestChange(cpu_min=2))
        daemon.step()
        assert vms["busy"].cpu_targets[-1] == 0
        assert vms["busy"].affinity_at_target[-1] == PROCESSORS  # room before the vCPU
        assert affinity(vms["busy"]) == {PROCESSORS} == affinity(vms["idle"])
    finally:
        daemon.hv.close()


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
    tmp_path: Path, vms: dict[str, FakeAgentVm]
) -> None:
    state = StateDir(tmp_path)
    for name in vms:
        state.save(replace(record(name), agent_socket="/x", ram_file="/y", cpus=2, pid=1))
    daemon = Daemon(
        DaemonConfig.model_validate({"daemon": {"budget": "4GiB"}}),
        state,
        clock=time.monotonic,
        meminfo=lambda: HOST,
        connector=lambda r: vms[r.name],
    )
    try:
        daemon.step()
        status = daemon.status()
        assert status is not None and status.host.cpus is None
        assert all(g.cpu is None for g in status.guests)
        assert all(vm.cpu_targets == [] for vm in vms.values())
    finally:
        daemon.hv.close()


def test_a_processor_list_is_linux_s_cpu_list_format() -> None:
    from balloonist.daemon.config import parse_cpu_list

    assert parse_cpu_list("0-3,6") == (0, 1, 2, 3, 6)
    assert parse_cpu_list(" 5 , 2-3,3") == (2, 3, 5)
    for bad in ("", "x", "3-1", "0-8192", "1,,2"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)
