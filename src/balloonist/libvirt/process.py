"""What the host itself says about a libvirt domain's QEMU process.

An agent domain needs two things libvirt's API does not give: the file that holds the
guest's RAM (the host punches the agent's freed pages out of it) and the threads that
run its vCPUs (their CPU time is the CPU balloon's demand signal). Both are read from
the QEMU process libvirt started: its pid from libvirt's pid file, the RAM file from
its command line (libvirt passes ``-object`` as JSON), the vCPU threads from the names
QEMU gives them (``CPU 0/KVM``, ``CPU 0/TCG``). Only for a local connection; a remote
domain is managed through its virtio balloon alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Final

#: Where libvirtd (qemu:///system) writes each running domain's QEMU pid.
RUN_DIR: Final = Path("/run/libvirt/qemu")
PROC: Final = Path("/proc")
#: Filesystems whose files are memory: holes punched in them are the host's again.
MEMORY_FILESYSTEMS: Final = frozenset({"tmpfs", "hugetlbfs"})
_VCPU_THREAD = re.compile(r"CPU (\d+)/(?:KVM|TCG)")
#: Single-threaded TCG runs every vCPU in one thread.
_ALL_VCPUS_THREAD = "ALL CPUs/TCG"


def domain_pid(name: str, run_dir: Path = RUN_DIR) -> int | None:
    """The QEMU pid of the running domain, or None (not local, not running)."""
    try:
        text = (run_dir / f"{name}.pid").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def shared_ram_file(argv: Sequence[str]) -> str | None:
    """The guest RAM's file, if QEMU's command line has exactly one shared
    ``memory-backend-file`` (a domain with several, one per NUMA node, is not one the
    agent can serve)."""
    files = []
    for arg in argv:
        if not arg.startswith("{"):
            continue
        try:
            obj = json.loads(arg)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("qom-type") == "memory-backend-file":
            path = obj.get("mem-path")
            if obj.get("share") is True and isinstance(path, str):
                files.append(path)
    return files[0] if len(files) == 1 else None


def filesystem_type(path: str, mounts: str) -> str | None:
    """The type of the filesystem ``path`` is on, from ``/proc/mounts``'s text (the
    longest mount point that contains it; a later mount over the same point wins)."""
    best: tuple[int, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = point in ("/", path) or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):
            best = (len(point), fields[2])
    return None if best is None else best[1]


def command_line(pid: int, proc: Path = PROC) -> list[str]:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def vcpu_threads(pid: int, vcpus: int, proc: Path = PROC) -> dict[int, int]:
    """cpu-index -> thread id, from the names QEMU gives its vCPU threads."""
    threads: dict[int, int] = {}
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except OSError:
        return {}
    for task in tasks:
        try:
            name = (task / "comm").read_text().strip()
        except OSError:
            continue  # the thread ended meanwhile
        if name == _ALL_VCPUS_THREAD and task.name.isdigit():
            return dict.fromkeys(range(vcpus), int(task.name))
        match = _VCPU_THREAD.fullmatch(name)
        if match and task.name.isdigit():
            threads[int(match.group(1))] = int(task.name)
    return dict(sorted(threads.items()))


__all__ = [
    "MEMORY_FILESYSTEMS",
    "command_line",
    "domain_pid",
    "filesystem_type",
    "shared_ram_file",
    "vcpu_threads",
]
