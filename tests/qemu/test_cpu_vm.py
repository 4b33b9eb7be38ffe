"""The CPU balloon on a real guest under TCG (patent claims 11 and 19), end to end: a
2-vCPU agent VM runs the shipped agent and two busy worker processes (started by
``guest_agent_supervisor.py``); the host reserves one vCPU through ``AgentPort``, the
guest takes it offline and its scheduler moves the work onto the other, and the host
narrows the VM's vCPU threads to one host processor with ``balloonist.qemu.affinity``.
Deflating widens the affinity first, then brings the vCPU back. Marked ``vm``.

What is measured, and against what:

- the guest's own view, read by a process other than the agent: each worker prints
  the guest's ``/sys/devices/system/cpu/online`` and the CPU it last ran on;
- the host's view: ``sched_getaffinity`` of every vCPU thread (from QMP
  ``query-cpus-fast``), and of QEMU's main thread, which must not change;
- the workload: every worker's count must keep rising, PROGRESS_LINES lines (each
  about a second of work) in each phase, without a gap longer than MAX_WORK_GAP_S,
  and run only on the vCPUs online;
- the offline vCPU's thread: its host CPU time while offline, at most
  OFFLINE_VCPU_MAX_SHARE of the time (an offline x86 vCPU halts, and a halted TCG vCPU
  thread sleeps);
- refusals: the host's own check (ConfigError naming the VM), and the guest's, reached
  by telling the host the VM has one vCPU more than it has;
- a second test: an agent killed with a vCPU offline leaves it offline (nothing brings
  a vCPU back by itself), the next agent adopts it from its state file and the host
  claims it with the welcome, so the guest never has it back in between; SIGTERM then
  brings it back;
- a third: the daemon itself, sharing the host's processors 0-1 by policy, with the
  VM's processor limit changed live: 1 vCPU online inside and its threads on processor
  0, then both back, the work going on throughout.

Deadlines and thresholds:

- AGENT_TIMEOUT_S = 90: Python starting over 9p under TCG takes about 5 s, and the two
  busy workers share the guest with it; the rest is room for a loaded host.
- CPU_CHANGE_TIMEOUT_S = 30: one hotplug write took 30-110 ms in this guest and the
  agent steps every 0.2 s, so a change is reported within a second or two; 30 s is room
  for a loaded host without hiding a hang.
- WORK_TIMEOUT_S = 60: PROGRESS_LINES = 3 lines a worker at one a second, with two busy
  workers (and, while reserved, the agent too) on the guest's vCPUs under TCG.
- MAX_WORK_GAP_S = 10: a worker prints about once a second; ten without a line means it
  stalled, which moving its work to the other vCPU must not cause.
- OFFLINE_VCPU_MAX_SHARE = 0.05: 5 % of one host processor; a busy vCPU uses nearly
  100 %, and the measured figure for an offline one is near 0.
- SILENCE_TIMEOUT_S (agent_link): the host takes a silent agent for gone after 5 s;
  10 s more for a loaded host.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from balloonist.daemon.agent_link import SILENCE_TIMEOUT_S, AgentPort
from balloonist.daemon.control import GuestChange
from balloonist.daemon.processors import threads_cpu_s
from balloonist.daemon.service import Daemon, DaemonConfig
from balloonist.errors import ConfigError
from balloonist.qemu import launcher
from balloonist.qemu.affinity import narrow_vcpu_affinity, set_vcpu_affinity, vcpu_affinity
from balloonist.qemu.assets import GuestAssets
from tests.waiting import until

from .conftest import (
    BOOT_TIMEOUT_S,
    agent_port,
    boot_supervised,
    command,
    serial_lines,
)

pytestmark = pytest.mark.vm

VCPUS = 2
WORKERS = 2
MEMORY_MIB = 384
AGENT_TIMEOUT_S = 90.0
CPU_CHANGE_TIMEOUT_S = 30.0
WORK_TIMEOUT_S = 60.0
PROGRESS_LINES = 3
MAX_WORK_GAP_S = 10.0
OFFLINE_VCPU_MAX_SHARE = 0.05
WORK_RE = re.compile(r"^SUPERVISOR work id=(\d+) n=(\d+) cpu=(\d+) online=(\S+)$")
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class WorkLine:
    worker: int
    count: int
    cpu: int
    online: str
    seen_s: float


class Serial:
    """The guest's serial log, read as it grows; work lines are timed when first seen."""

    def __init__(self, record: launcher.VMRecord) -> None:
        self.record = record
        self.work: list[WorkLine] = []
        self._read = 0

    def poll(self) -> None:
        lines = serial_lines(self.record)
        now = time.monotonic()
        for line in lines[self._read :]:
            if m := WORK_RE.match(line):
                worker, count, cpu, online = m.groups()
                self.work.append(WorkLine(int(worker), int(count), int(cpu), online, now))
        self._read = len(lines)

    def mark(self) -> int:
        self.poll()
        return len(self.work)

    def since(self, mark: int) -> list[WorkLine]:
        self.poll()
        return self.work[mark:]

    def text(self) -> list[str]:
        return serial_lines(self.record)


def thread_cpu_s(pid: int, tid: int) -> float:
    return threads_cpu_s(pid, {0: tid})


async def progress(serial: Serial, *, online: str, cpus: set[int], workers: int = WORKERS) -> float:
    """Wait for PROGRESS_LINES new lines from every worker, all showing ``online`` and
    running on ``cpus``, each worker's count rising, no gap over MAX_WORK_GAP_S.
    Returns the workers' combined rate, counts per second (reported, not judged: TCG
    on a shared host is too noisy for a ratio to mean much).

    Counting starts after each worker's first line showing ``online``: a worker may
    print one more line with what it read just before a change."""
    mark = serial.mark()
    started_s = time.monotonic()

    def settled(i: int) -> list[WorkLine]:
        mine = [w for w in serial.since(mark) if w.worker == i]
        first = next((n for n, w in enumerate(mine) if w.online == online), len(mine))
        return mine[first + 1 :]

    def enough() -> bool:
        return all(len(settled(i)) >= PROGRESS_LINES for i in range(workers))

    await until(enough, WORK_TIMEOUT_S, f"{PROGRESS_LINES} work lines from each worker")
    rate = 0.0
    for i in range(workers):
        mine = settled(i)
        counts = [w.count for w in mine]
        assert counts == sorted(counts) and len(set(counts)) == len(counts), counts
        times = [started_s] + [w.seen_s for w in mine]
        gap_s = max(b - a for a, b in itertools.pairwise(times))
        assert gap_s <= MAX_WORK_GAP_S, f"worker {i} stalled for {gap_s:.1f} s"
        assert {w.online for w in mine} == {online}, [w.online for w in mine]
        assert {w.cpu for w in mine} <= cpus, [w.cpu for w in mine]
        rate += (mine[-1].count - mine[0].count) / max(1e-3, mine[-1].seen_s - mine[0].seen_s)
    return rate


def boot_cpu_vm(
    state: launcher.StateDir, assets: GuestAssets, name: str, pyz: Path, control: Path
) -> launcher.VMRecord:
    return boot_supervised(state, assets, name, pyz, control, memory_mib=MEMORY_MIB, cpus=VCPUS)


def supervisor_said(serial: Serial, line: str, after: int = 0) -> bool:
    return any(text.startswith(f"SUPERVISOR {line}") for text in serial.text()[after:])


def test_reserving_a_vcpu_moves_the_work_in_the_guest_and_frees_a_host_processor(
    state: launcher.StateDir, guest_assets: GuestAssets, agent_pyz: Path, control: Path
) -> None:
    record = boot_cpu_vm(state, guest_assets, "cpus", agent_pyz, control)
    assert record.pid is not None
    pid = record.pid
    serial = Serial(record)
    timings: dict[str, float] = {}

    async def scenario() -> None:
        await until(lambda: supervisor_said(serial, "agent started"), BOOT_TIMEOUT_S, "the agent")
        command(control, f"work-{WORKERS}")
        timings["work on 2 vCPUs, counts/s"] = await progress(serial, online="0-1", cpus={0, 1})
        async with agent_port(record) as port:
            await until(lambda: port.session.alive(time.monotonic()), AGENT_TIMEOUT_S, "hello")
            threads = await port.vcpu_threads()
            assert sorted(threads) == list(range(VCPUS))
            before = vcpu_affinity(pid, threads)
            qemu_before = os.sched_getaffinity(pid)
            host_cpus = before[0]
            assert all(mask == host_cpus for mask in before.values())
            assert len(host_cpus) >= 2, "the host must have two processors to free one"
            grant = frozenset({min(host_cpus)})

            await _inflate(port, serial, pid, threads, grant, qemu_before, timings)
            await _refuse(port, serial, record.name, timings)
            await _deflate(port, serial, pid, threads, before, timings)
            assert not port.session.violations

    try:
        asyncio.run(scenario())
    finally:
        for what, value in timings.items():
            print(
                f"cpu balloon: {what}: {value:.3f}"
                if value < 100
                else f"cpu balloon: {what}: {value:,.0f}"
            )


def _reserved(port: AgentPort) -> tuple[int, ...] | None:
    report = port.cpu_report
    return None if report is None else report.reserved_vcpus


async def _inflate(
    port: AgentPort,
    serial: Serial,
    pid: int,
    threads: dict[int, int],
    grant: frozenset[int],
    qemu_before: set[int],
    timings: dict[str, float],
) -> None:
    """The guest takes vCPU 1 offline first, then the host takes its processor back."""
    mark = serial.mark()
    asked_s = time.monotonic()
    await port.set_cpu_target(1)
    await until(lambda: _reserved(port) == (1,), CPU_CHANGE_TIMEOUT_S, "vCPU 1 reserved")
    timings["reserve: agent's report, s"] = time.monotonic() - asked_s
    assert port.cpu_report is not None and port.cpu_report.online_vcpus == (0,)
    await until(
        lambda: any(w.online == "0" for w in serial.since(mark)),
        CPU_CHANGE_TIMEOUT_S,
        "online=0 in the guest",
    )
    timings["reserve: a worker line shows it, s"] = time.monotonic() - asked_s
    assert narrow_vcpu_affinity(pid, threads, grant) == {i: grant for i in threads}
    assert vcpu_affinity(pid, threads) == {i: grant for i in threads}
    assert os.sched_getaffinity(pid) == qemu_before  # only the vCPU threads moved

    offline_cpu_s = thread_cpu_s(pid, threads[1])
    offline_at_s = time.monotonic()
    timings["work on 1 vCPU and 1 host processor, counts/s"] = await progress(
        serial, online="0", cpus={0}
    )
    share = (thread_cpu_s(pid, threads[1]) - offline_cpu_s) / (time.monotonic() - offline_at_s)
    timings["offline vCPU's thread, share of a host processor"] = share
    assert share <= OFFLINE_VCPU_MAX_SHARE


async def _refuse(port: AgentPort, serial: Serial, name: str, timings: dict[str, float]) -> None:
    """Refusals: by the host, and by the guest; nothing moves."""
    with pytest.raises(ConfigError, match="at least one must stay online") as refused:
        await port.set_cpu_target(VCPUS)
    assert str(refused.value).startswith(f"{name}: cannot reserve 2 of its 2")
    mark = serial.mark()
    port.session.vcpus = VCPUS + 1  # a host wrong about the VM: the guest says no
    await port.set_cpu_target(VCPUS)
    timings["the guest's refusal, s"] = await until(
        lambda: port.cpu_error is not None, CPU_CHANGE_TIMEOUT_S, "the guest's refusal"
    )
    port.session.vcpus = VCPUS
    assert port.cpu_error is not None and port.cpu_error.code == "cpu-refused"
    assert "would leave none online" in port.cpu_error.message
    assert _reserved(port) == (1,)  # nothing moved, as the guest's workers see too
    await until(lambda: bool(serial.since(mark)), WORK_TIMEOUT_S, "a work line")
    assert {w.online for w in serial.since(mark)} == {"0"}


async def _deflate(
    port: AgentPort,
    serial: Serial,
    pid: int,
    threads: dict[int, int],
    before: dict[int, frozenset[int]],
    timings: dict[str, float],
) -> None:
    """The host gives the processor back first, then the guest brings vCPU 1 online."""
    assert set_vcpu_affinity(pid, threads, before) == before
    mark = serial.mark()
    asked_s = time.monotonic()
    await port.set_cpu_target(0)
    await until(lambda: _reserved(port) == (), CPU_CHANGE_TIMEOUT_S, "vCPU 1 back")
    timings["deflate: agent's report, s"] = time.monotonic() - asked_s
    assert port.cpu_report is not None and list(port.cpu_report.online_vcpus) == [0, 1]
    await until(
        lambda: any(w.online == "0-1" for w in serial.since(mark)),
        CPU_CHANGE_TIMEOUT_S,
        "online=0-1 in the guest",
    )
    timings["deflate: a worker line shows it, s"] = time.monotonic() - asked_s
    # The guest's scheduler uses the vCPU again: a worker runs on it.
    await until(
        lambda: any(w.cpu == 1 and w.online == "0-1" for w in serial.since(mark)),
        WORK_TIMEOUT_S,
        "a worker on cpu 1",
    )
    timings["deflate: a worker line from vCPU 1, s"] = time.monotonic() - asked_s
    assert vcpu_affinity(pid, threads) == before
    timings["work on 2 vCPUs again, counts/s"] = await progress(serial, online="0-1", cpus={0, 1})


def test_a_killed_agents_vcpu_stays_offline_is_adopted_and_sigterm_gives_it_back(
    state: launcher.StateDir, guest_assets: GuestAssets, agent_pyz: Path, control: Path
) -> None:
    """Unlike pinned pages, an offline vCPU does not come back when the agent dies: the
    next agent finds it in its state file, and the host claims it again with the new
    session's welcome, so the guest never gets it back in between; SIGTERM does."""
    record = boot_cpu_vm(state, guest_assets, "cpukill", agent_pyz, control)
    serial = Serial(record)

    async def scenario() -> None:
        await until(lambda: supervisor_said(serial, "agent started"), BOOT_TIMEOUT_S, "the agent")
        command(control, "work-1")
        await progress(serial, online="0-1", cpus={0, 1}, workers=1)
        async with agent_port(record) as port:

            def reserved() -> tuple[int, ...] | None:
                report = port.cpu_report
                return None if report is None else report.reserved_vcpus

            await until(lambda: port.session.alive(time.monotonic()), AGENT_TIMEOUT_S, "hello")
            await port.set_cpu_target(1)
            await until(lambda: reserved() == (1,), CPU_CHANGE_TIMEOUT_S, "vCPU 1 reserved")
            first_token = port.session.token
            killed_at = serial.mark()
            command(control, "kill")
            await until(lambda: not port.cooperative, SILENCE_TIMEOUT_S + 10, "the host to notice")
            await progress(serial, online="0", cpus={0}, workers=1)  # still offline
            command(control, "start")
            await until(
                lambda: port.cooperative and port.session.token != first_token,
                AGENT_TIMEOUT_S,
                "a new agent's session",
            )
            await until(lambda: reserved() == (1,), CPU_CHANGE_TIMEOUT_S, "vCPU 1 adopted")
            await progress(serial, online="0", cpus={0}, workers=1)
            assert {w.online for w in serial.since(killed_at)} == {"0"}  # never back between
            mark = len(serial.text())
            command(control, "term")
            await until(
                lambda: supervisor_said(serial, "agent exited rc=0", after=mark),
                CPU_CHANGE_TIMEOUT_S,
                "the agent to stop",
            )
            await progress(serial, online="0-1", cpus={0, 1}, workers=1)
            assert not port.session.violations

    asyncio.run(scenario())


def test_the_daemon_shares_the_host_s_processors_by_policy(
    state: launcher.StateDir, guest_assets: GuestAssets, agent_pyz: Path, control: Path
) -> None:
    """The daemon, with ``processors = "0-1"``, over the 2-vCPU agent VM: a live
    ``max_cpus`` of 1 makes the policy grant one processor, the agent takes a vCPU
    offline and the daemon narrows the vCPU threads to processor 0; ``max_cpus`` 2 gives
    both back, the threads widened first."""
    record = boot_cpu_vm(state, guest_assets, "dcpu", agent_pyz, control)
    assert record.pid is not None
    pid = record.pid
    serial = Serial(record)
    config = DaemonConfig.model_validate({"daemon": {"budget": "1GiB", "processors": "0-1"}})
    daemon = Daemon(config, state)

    def run_until(condition: Callable[[], bool], deadline_s: float, what: str) -> None:
        end = time.monotonic() + deadline_s
        while not condition():
            if time.monotonic() > end:
                raise AssertionError(f"not within {deadline_s:.0f} s: {what}")
            started = time.monotonic()
            daemon.step()
            daemon.idle(max(0.0, 1.0 - (time.monotonic() - started)))

    def online() -> int | None:
        status = daemon.status()
        guest = status.guest("dcpu") if status is not None else None
        return None if guest is None or guest.cpu is None else guest.cpu.online_vcpus

    def threads_on() -> set[frozenset[int]]:
        view = daemon.hv.view("dcpu")
        threads = view.vcpu_threads if view is not None else None
        return set() if threads is None else set(vcpu_affinity(pid, threads).values())

    def work_goes_on(*, online: str, cpus: set[int]) -> None:
        """PROGRESS_LINES more lines from every worker showing ``online``, on ``cpus``,
        counts rising (the daemon keeps serving the agent meanwhile)."""
        mark = serial.mark()

        def lines(i: int) -> list[WorkLine]:
            # From the second line showing ``online``: the first may have been printed
            # on the vCPU that just went.
            return [w for w in serial.since(mark) if w.worker == i and w.online == online][1:]

        run_until(
            lambda: all(len(lines(i)) >= PROGRESS_LINES for i in range(WORKERS)),
            WORK_TIMEOUT_S,
            f"{PROGRESS_LINES} work lines from each worker with online={online}",
        )
        for i in range(WORKERS):
            counts = [w.count for w in lines(i)]
            assert counts == sorted(set(counts)), counts
            assert {w.cpu for w in lines(i)} <= cpus, [w.cpu for w in lines(i)]

    try:
        run_until(lambda: supervisor_said(serial, "agent started"), BOOT_TIMEOUT_S, "the agent")
        command(control, f"work-{WORKERS}")
        run_until(lambda: online() == VCPUS, AGENT_TIMEOUT_S, "the daemon to see 2 vCPUs")
        run_until(lambda: threads_on() == {frozenset({0, 1})}, CPU_CHANGE_TIMEOUT_S, "0-1")

        mark = serial.mark()
        daemon.change_guest("dcpu", GuestChange(max_cpus=1))
        run_until(
            lambda: online() == 1 and threads_on() == {frozenset({0})},
            CPU_CHANGE_TIMEOUT_S,
            "1 vCPU online and its threads on processor 0",
        )
        run_until(
            lambda: any(w.online == "0" for w in serial.since(mark)),
            CPU_CHANGE_TIMEOUT_S,
            "online=0 in the guest",
        )
        work_goes_on(online="0", cpus={0})

        mark = serial.mark()
        daemon.change_guest("dcpu", GuestChange(max_cpus=2))
        run_until(
            lambda: online() == VCPUS and threads_on() == {frozenset({0, 1})},
            CPU_CHANGE_TIMEOUT_S,
            "both vCPUs back on both processors",
        )
        run_until(
            lambda: any(w.online == "0-1" for w in serial.since(mark)),
            CPU_CHANGE_TIMEOUT_S,
            "online=0-1 in the guest",
        )
        work_goes_on(online="0-1", cpus={0, 1})
        status = daemon.status()
        assert status is not None and status.host.cpus == 2
    finally:
        daemon.close()
