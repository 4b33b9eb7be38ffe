"""Fixtures for real-guest tests: QEMU, guest assets, a state directory, booted guests.

When the CI environment variable is set, a missing QEMU or guest asset is a failure,
never a skip: CI must prove the real-VM path works.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from balloonist.daemon.agent_link import AgentPort
from balloonist.daemon.processors import threads_cpu_s
from balloonist.daemon.qemu_hv import vm_port
from balloonist.daemon.service import Daemon
from balloonist.daemon.status import GuestStatus
from balloonist.errors import TransientBackendError
from balloonist.qemu import launcher
from balloonist.qemu.assets import GUEST_OWN_DIRS, GuestAssets, default_cache_dir, host_python
from balloonist.units import MIB

ROOT = Path(__file__).resolve().parents[2]

#: A guest under TCG prints BALLOONIST-READY about 7 s after QEMU starts on this kind
#: of machine; allow for a loaded CI host.
BOOT_TIMEOUT_S = 90.0


def _shared_dir() -> Path:
    """Where files a host-root guest must see go: not under /tmp or /run, which the
    guest mounts its own (a clone of this repository may well live under /tmp)."""
    for candidate in (ROOT / ".cache", default_cache_dir().parent, Path("/var/tmp")):
        if not f"{candidate.resolve()}/".startswith(GUEST_OWN_DIRS):
            return candidate / "guest-shared"
    raise AssertionError("no directory a host-root guest can see")


#: Files a host-root guest must see (the agent, scripts, control files).
SHARED_DIR = _shared_dir()


def guest_visible(path: Path) -> Path:
    """A copy of ``path`` in SHARED_DIR, where a host-root guest can open it."""
    SHARED_DIR.mkdir(parents=True, exist_ok=True)
    copy = SHARED_DIR / path.name
    shutil.copyfile(path, copy)
    return copy


@pytest.fixture(scope="session")
def agent_pyz() -> Path:
    """The shipped agent, built from this tree where host-root guests can run it."""
    from balloonist.agent.pyz import build_pyz

    return build_pyz(SHARED_DIR / "balloonist-agent.pyz")


@pytest.fixture
def state(tmp_path: Path) -> Iterator[launcher.StateDir]:
    # unix socket paths must stay short: tmp_path can be long
    short = Path(f"/tmp/bn-{os.getpid()}-{time.monotonic_ns() % 10**9}")
    short.mkdir()
    state = launcher.StateDir(short)
    yield state
    stop_guests(state)
    shutil.rmtree(short, ignore_errors=True)


def stop_guests(state: launcher.StateDir) -> None:
    """Stop every guest in ``state`` and drop its cgroup and RAM file."""
    for name in state.names():
        launcher.stop_vm(state, name)


def boot(
    state: launcher.StateDir,
    assets: GuestAssets,
    name: str,
    *,
    memory_mib: int = 512,
    work: str | None = None,
    **request: Any,
) -> launcher.VMRecord:
    record = launcher.start_vm(
        state,
        # nested KVM hangs on the CI machines; see docs/vms.md
        assets.start_request(name, memory_mib * MIB, work=work, accel="tcg", **request),
    )
    wait_for_line(record, "BALLOONIST-READY", BOOT_TIMEOUT_S)
    return record


def serial_lines(record: launcher.VMRecord) -> list[str]:
    assert record.serial_log is not None
    try:
        return Path(record.serial_log).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


#: A guest's workload (touchmem) keeps its schedule on the guest's clock, which under
#: TCG falls behind the host's once the host is loaded: 25 guest seconds in 60 beside
#: two busy processes here, and a guest in a CI run counted 54 s in at least 93. Tests
#: wait for a phase's serial line, with room for a clock at a quarter of the host's.
GUEST_CLOCK_SLOWDOWN = 4


def work_phase_began(lines: list[str], ws_mib: int) -> bool:
    """Whether the guest's workload has reached its phase of ``ws_mib`` MiB."""
    return any("BALLOONIST-WORK" in line and f" ws_mib={ws_mib} " in line for line in lines)


def wait_for_line(record: launcher.VMRecord, pattern: str, timeout_s: float, after: int = 0) -> str:
    """The first serial line at or after index ``after`` matching ``pattern``."""
    deadline = time.monotonic() + timeout_s
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        for line in serial_lines(record)[after:]:
            if regex.search(line):
                return line
        time.sleep(0.2)
    tail = "\n".join(serial_lines(record)[-5:])
    raise AssertionError(
        f"{record.name}: no serial line matching {pattern!r} in {timeout_s} s:\n{tail}\n"
        f"{vm_diagnosis(record)}"
    )


#: QMP's answer to a diagnosis's commands; it is only read when a test has failed.
DIAGNOSIS_TIMEOUT_S = 5.0


def vm_diagnosis(record: launcher.VMRecord) -> str:
    """What a guest that said nothing was doing, for the failure message: whether QEMU
    lives, its run state, its vCPUs' instruction pointers twice a second apart (moving
    or stuck), the CPU time each of its threads used meanwhile (spinning or asleep),
    and its cgroup's memory figures."""
    if record.pid is None or not record.running():
        return f"QEMU (pid {record.pid}) is not running"
    lines = []
    cpu_before_s = _threads_cpu_s(record.pid)
    monitor = QEMUMonitorProtocol(record.qmp_socket)
    try:
        monitor.connect()
        monitor.settimeout(DIAGNOSIS_TIMEOUT_S)
        lines.append(f"status: {monitor.cmd('query-status')}")
        hmp = {"command-line": "info registers -a"}
        for _ in range(2):
            registers = str(monitor.cmd("human-monitor-command", **hmp)).splitlines()
            lines += [f"  {line}" for line in registers if "CPU#" in line or "RIP=" in line]
            time.sleep(1.0)
    except (QMPError, OSError) as exc:
        lines.append(f"QMP: {exc!r}")
    finally:
        monitor.close()
    cpu_after_s = _threads_cpu_s(record.pid)
    lines.append(f"QEMU pid {record.pid}, CPU s per thread meanwhile:")
    lines += [
        f"  {tid}: {cpu_after_s[tid] - s:.2f}"
        for tid, s in cpu_before_s.items()
        if tid in cpu_after_s
    ]
    if record.cgroup is not None:
        for name in ("memory.usage_in_bytes", "memory.limit_in_bytes", "memory.failcnt"):
            with contextlib.suppress(OSError):
                lines.append(f"{name}: {Path(record.cgroup, name).read_text().strip()}")
    return "\n".join(lines)


def _threads_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds each of process ``pid``'s threads has used; none once it is gone."""
    cpu_s: dict[int, float] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(TransientBackendError):  # a thread that just ended
                cpu_s[int(task.name)] = threads_cpu_s(pid, {0: int(task.name)})
    return dict(sorted(cpu_s.items()))


def meminfo_kib(line: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}


#: Runs in a host-root test guest: starts the agent and obeys ``command``s.
SUPERVISOR = Path(__file__).with_name("guest_agent_supervisor.py")


def boot_supervised(
    state: launcher.StateDir,
    assets: GuestAssets,
    name: str,
    pyz: Path,
    control: Path,
    *,
    memory_mib: int,
    **request: Any,
) -> launcher.VMRecord:
    """An agent VM whose guest runs SUPERVISOR with the agent ``pyz`` and ``control``."""
    return boot(
        state,
        assets,
        name,
        memory_mib=memory_mib,
        agent=True,
        run=(host_python(), str(guest_visible(SUPERVISOR)), str(pyz), str(control)),
        **request,
    )


@pytest.fixture
def control() -> Iterator[Path]:
    """A directory the test guest's supervisor watches for commands (see ``command``)."""
    path = SHARED_DIR / f"ctl-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def command(control: Path, verb: str) -> None:
    """Tell ``guest_agent_supervisor.py`` in the guest to do ``verb`` (in order)."""
    n = len(list(control.iterdir())) + 1
    (control / f"{n}-{verb}").touch()


@asynccontextmanager
async def agent_port(record: launcher.VMRecord) -> AsyncIterator[AgentPort]:
    """The daemon's own port to the VM's agent (``vm_port``), connected, for the body."""
    port = vm_port(record, time.monotonic)
    assert isinstance(port, AgentPort), f"{record.name} is not an agent VM"
    await port.connect()
    try:
        yield port
    finally:
        await port.close()
        port.release()


def guest_status(daemon: Daemon, name: str) -> GuestStatus:
    """The guest in the daemon's last status; fails the test if it is not there."""
    status = daemon.status()
    assert status is not None
    guest = status.guest(name)
    assert guest is not None, f"{name} is not in the status"
    return guest


def stepper(daemon: Daemon) -> Callable[[Callable[[], bool] | None, float], bool]:
    """Run the daemon's periods (1 s each) until ``condition`` holds or time is up."""

    def run_until(condition: Callable[[], bool] | None, deadline_s: float) -> bool:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            started = time.monotonic()
            daemon.step()
            if condition is not None and condition():
                return True
            daemon.idle(max(0.0, 1.0 - (time.monotonic() - started)))
        return False

    return run_until
