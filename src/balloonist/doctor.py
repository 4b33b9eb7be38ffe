"""``balloonist doctor``: what this host offers balloonist, one line a check.

Each check reads the host through one small port (:class:`HostProbe`): files, a
device, a command's output, free room in a directory, whether a module imports. The
verdicts are pure functions of what it read, so the tests give them a fake host.

A check is **ok**, a **note** (something optional is missing, or worth knowing), or a
**problem** (balloonist cannot do what the line names). The command exits 1 when any
check is a problem, so scripts can gate on it.

What it does not do: it never starts a guest. Whether KVM really runs one here is
not checked (nested KVM can open ``/dev/kvm`` and still hang while Linux boots;
``balloonist vm start --accel tcg`` avoids it), and libvirt's connection is opened
read-only.
"""

from __future__ import annotations

import enum
import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, TextIO

from balloonist.libvirt.connection import DEFAULT_URI
from balloonist.units import format_size

#: The QEMU the daemon starts guests with (``qemu/launcher.py``).
QEMU: Final = "qemu-system-x86_64"
#: Free page reporting and deflate-on-oom arrived in QEMU 5.1 and 2.x; older QEMUs
#: are not supported.
MIN_QEMU: Final = (5, 1)
#: Seconds a probe command may take.
COMMAND_TIMEOUT_S: Final = 10.0


class Verdict(enum.Enum):
    OK = "ok"
    NOTE = "note"
    PROBLEM = "problem"


@dataclass(frozen=True)
class Finding:
    check: str
    verdict: Verdict
    detail: str  # one line


class HostProbe(Protocol):
    """What the checks read of the host."""

    def read_text(self, path: str) -> str | None:
        """The file's text, or None if it is missing or unreadable."""
        ...

    def exists(self, path: str) -> bool: ...

    def opens_read_write(self, path: str) -> bool: ...

    def run(self, argv: Sequence[str]) -> tuple[int, str] | None:
        """(exit status, stdout and stderr), or None if the program is not there."""
        ...

    def free_bytes(self, path: str) -> int | None: ...

    def imports(self, module: str) -> bool: ...

    def libvirt_version(self, uri: str) -> str:
        """libvirt's version over ``uri``, opened read-only; raises OSError with
        libvirt's message if it cannot connect."""
        ...

    def libvirt_writable(self, uri: str) -> str | None:
        """None if ``uri`` opens read-write (the daemon changes balloons and metadata),
        else libvirt's reason."""
        ...

    def kvm_boots(self) -> bool:
        """Whether QEMU under KVM runs a boot sector within a second (``vm start
        --accel auto`` asks the same)."""
        ...


def check_kvm(probe: HostProbe) -> Finding:
    if not probe.exists("/dev/kvm"):
        return Finding("kvm", Verdict.NOTE, "no /dev/kvm: guests run under TCG, far slower")
    if not probe.opens_read_write("/dev/kvm"):
        return Finding(
            "kvm", Verdict.NOTE, "/dev/kvm is not open to this user (root, or group kvm)"
        )
    if not probe.kvm_boots():
        return Finding(
            "kvm",
            Verdict.NOTE,
            "/dev/kvm opens, but QEMU under KVM did not run a boot sector within 1 s: "
            "guests get TCG (vm start --accel auto)",
        )
    return Finding(
        "kvm",
        Verdict.OK,
        "QEMU under KVM runs a boot sector (a nested KVM may still hang booting Linux: "
        "then vm start --accel tcg)",
    )


def qemu_version(text: str) -> tuple[int, int, int] | None:
    found = re.search(r"version (\d+)\.(\d+)\.(\d+)", text)
    return None if found is None else (int(found[1]), int(found[2]), int(found[3]))


def check_qemu(probe: HostProbe) -> Finding:
    answer = probe.run([QEMU, "--version"])
    if answer is None:
        return Finding(
            "qemu", Verdict.PROBLEM, f"{QEMU} not found (Debian: apt-get install qemu-system-x86)"
        )
    version = qemu_version(answer[1])
    if answer[0] != 0 or version is None:
        return Finding(
            "qemu", Verdict.PROBLEM, f"{QEMU} --version failed: {_first_line(answer[1])}"
        )
    shown = ".".join(map(str, version))
    if version[:2] < MIN_QEMU:
        return Finding("qemu", Verdict.PROBLEM, f"QEMU {shown} is older than 5.1")
    return Finding("qemu", Verdict.OK, f"QEMU {shown}")


def check_balloon_features(probe: HostProbe) -> Finding:
    answer = probe.run([QEMU, "-device", "virtio-balloon-pci,help"])
    if answer is None or answer[0] != 0:
        return Finding("balloon", Verdict.PROBLEM, "QEMU has no virtio-balloon-pci device")
    wanted = ("deflate-on-oom", "free-page-reporting")
    missing = [name for name in wanted if name not in answer[1]]
    mem = probe.run([QEMU, "-device", "help"])
    virtio_mem = mem is not None and "virtio-mem-pci" in mem[1]
    extra = "; virtio-mem-pci present" if virtio_mem else "; no virtio-mem-pci"
    if missing:
        return Finding(
            "balloon", Verdict.NOTE, f"virtio-balloon without {', '.join(missing)}{extra}"
        )
    return Finding("balloon", Verdict.OK, f"virtio-balloon with {', '.join(wanted)}{extra}")


def check_libvirt(probe: HostProbe, uri: str) -> Finding:
    if not probe.imports("libvirt"):
        return Finding(
            "libvirt", Verdict.NOTE, "libvirt-python is not installed: only VMs balloonist starts"
        )
    try:
        version = probe.libvirt_version(uri)
    except OSError as exc:
        return Finding("libvirt", Verdict.NOTE, f"{uri}: {_first_line(str(exc))}")
    refused = probe.libvirt_writable(uri)
    if refused is not None:
        return Finding(
            "libvirt",
            Verdict.NOTE,
            f"{uri}: libvirt {version}, read-only for this user ({_first_line(refused)}): "
            "daemon --libvirt needs root or group libvirt",
        )
    return Finding("libvirt", Verdict.OK, f"{uri}: libvirt {version}, read-write")


def check_cgroup(probe: HostProbe) -> Finding:
    controllers = probe.read_text("/sys/fs/cgroup/cgroup.controllers")
    if controllers is not None:
        if "memory" in controllers.split():
            return Finding("cgroup", Verdict.OK, "cgroup v2 with the memory controller")
        return Finding("cgroup", Verdict.NOTE, "cgroup v2 without the memory controller")
    if probe.exists("/sys/fs/cgroup/memory"):
        return Finding("cgroup", Verdict.OK, "cgroup v1 memory controller")
    return Finding("cgroup", Verdict.NOTE, "no memory cgroup: host-level reclaim is not possible")


def check_swap(probe: HostProbe) -> Finding:
    text = probe.read_text("/proc/meminfo")
    total = None
    for line in (text or "").splitlines():
        key, _, rest = line.partition(":")
        if key == "SwapTotal" and rest.split() and rest.split()[0].isdigit():
            total = int(rest.split()[0]) * 1024
    if not total:
        return Finding(
            "swap",
            Verdict.NOTE,
            "no swap: the host cannot page a VM whose balloon does not work (host paging)",
        )
    return Finding("swap", Verdict.OK, f"{format_size(total)} of swap for host paging")


def check_ksm(probe: HostProbe) -> Finding:
    run = probe.read_text("/sys/kernel/mm/ksm/run")
    if run is None:
        return Finding("ksm", Verdict.NOTE, "no KSM (/sys/kernel/mm/ksm): no page sharing")
    state = {"0": "stopped", "1": "running", "2": "unmerging"}.get(run.strip(), run.strip())
    sharing = (probe.read_text("/sys/kernel/mm/ksm/pages_sharing") or "?").strip()
    return Finding("ksm", Verdict.OK, f"KSM available, {state}, {sharing} pages sharing")


def check_psi(probe: HostProbe) -> Finding:
    if probe.read_text("/proc/pressure/memory") is None:
        return Finding(
            "psi", Verdict.NOTE, "no /proc/pressure/memory (PSI off: psi=1 on the kernel line)"
        )
    return Finding("psi", Verdict.OK, "memory pressure stall information (PSI) available")


def check_shm(probe: HostProbe) -> Finding:
    free = probe.free_bytes("/dev/shm")
    if free is None:
        return Finding(
            "shm", Verdict.NOTE, "no /dev/shm: agent VMs need their RAM in a shared file"
        )
    return Finding("shm", Verdict.OK, f"/dev/shm has {format_size(free)} free for agent VMs' RAM")


def diagnose(probe: HostProbe, *, libvirt_uri: str = DEFAULT_URI) -> list[Finding]:
    """Every check, in the order the command prints them."""
    checks: list[Callable[[HostProbe], Finding]] = [
        check_kvm,
        check_qemu,
        check_balloon_features,
        lambda p: check_libvirt(p, libvirt_uri),
        check_cgroup,
        check_swap,
        check_ksm,
        check_psi,
        check_shm,
    ]
    return [check(probe) for check in checks]


def render(findings: Sequence[Finding], out: TextIO) -> int:
    """One line a finding; the exit code: 1 if any is a problem."""
    width = max(len(f.check) for f in findings)
    for f in findings:
        print(f"{f.verdict.value:<7} {f.check:<{width}}  {f.detail}", file=out)
    return 1 if any(f.verdict is Verdict.PROBLEM for f in findings) else 0


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0][:200] if lines else "(no output)"


class SystemProbe:
    """The real host."""

    def read_text(self, path: str) -> str | None:
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                return f.read(65536)
        except OSError:
            return None

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def opens_read_write(self, path: str) -> bool:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return False
        os.close(fd)
        return True

    def run(self, argv: Sequence[str]) -> tuple[int, str] | None:
        if shutil.which(argv[0]) is None:
            return None
        try:
            done = subprocess.run(
                list(argv),
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_S,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return 1, str(exc)
        return done.returncode, done.stdout + done.stderr

    def free_bytes(self, path: str) -> int | None:
        try:
            stat = os.statvfs(path)
        except OSError:
            return None
        return stat.f_bavail * stat.f_frsize

    def imports(self, module: str) -> bool:
        return importlib.util.find_spec(module) is not None

    def libvirt_version(self, uri: str) -> str:
        from balloonist.libvirt.connection import import_libvirt

        libvirt = import_libvirt()  # optional: checked by imports(); quiets libvirt's stderr
        try:
            conn = libvirt.openReadOnly(uri)
        except libvirt.libvirtError as exc:
            raise OSError(str(exc)) from exc
        try:
            number = int(conn.getLibVersion())
        finally:
            conn.close()
        return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"

    def libvirt_writable(self, uri: str) -> str | None:
        from balloonist.libvirt.connection import import_libvirt

        libvirt = import_libvirt()
        try:
            libvirt.open(uri).close()
        except libvirt.libvirtError as exc:
            return str(exc)
        return None

    def kvm_boots(self) -> bool:
        from balloonist.qemu.launcher import kvm_works

        return shutil.which(QEMU) is not None and kvm_works(QEMU)


__all__ = ["Finding", "HostProbe", "SystemProbe", "Verdict", "diagnose", "render"]
