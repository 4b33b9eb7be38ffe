"""A VM's memory cgroup: where the host caps what a VM's QEMU may hold, and counts
what it swapped.

A guest whose balloon does not work (no driver, stalled, cut off for breaking the
protocol) can only give memory back the way the patent keeps for last: the host pages
it. Each VM balloonist starts runs in a memory cgroup of its own
(``<memory mount>/balloonist/<tag>-<name>``, the tag naming its state directory); a
libvirt domain already has one under ``machine``. Lowering the cgroup's limit makes
the kernel reclaim the VM's pages, so the host swaps them; raising it again lets them
fault back in.

- **cgroup v2**: the cap is ``memory.high`` (the kernel reclaims above it and
  throttles the process; it never OOM-kills for it); usage is ``memory.current``,
  swap ``memory.swap.current``.
- **cgroup v1**: the cap is ``memory.limit_in_bytes`` (the kernel reclaims to it when
  it is written, and refuses with EBUSY if it cannot), with
  ``memory.soft_limit_in_bytes`` at the same value; usage is ``memory.usage_in_bytes``,
  swap the ``swap`` line of ``memory.stat`` (with swap accounting on).

Writing a cap reclaims in the writer's own context, so the daemon writes from a worker
thread and lowers a cap in steps (:mod:`balloonist.daemon.host_reclaim`).
"""

from __future__ import annotations

import enum
import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from balloonist.errors import BackendError, FatalBackendError

#: Where the cgroups of VMs balloonist starts are made, under the memory hierarchy.
PARENT_NAME: Final = "balloonist"
#: The file that lists which processes are in a cgroup (both versions).
PROCS_FILE: Final = "cgroup.procs"
#: How long to wait for a stopped VM's cgroup to empty before leaving it.
REMOVE_TIMEOUT_S: Final = 5.0
#: A value read from a cgroup file is a number or a word; nothing longer.
_MAX_VALUE_CHARS: Final = 32
#: v1 writes its "no limit" as the largest page-aligned signed 64-bit number.
_V1_UNLIMITED_FROM: Final = 1 << 62


class CgroupVersion(enum.StrEnum):
    V1 = "v1"
    V2 = "v2"


@dataclass(frozen=True)
class MemoryHierarchy:
    """Where the memory controller is mounted, and which version it is."""

    mount: Path
    version: CgroupVersion
    #: The mount's root within the hierarchy ("/" but in a container that sees only
    #: part of it): processes' cgroup paths are relative to the hierarchy, not the mount.
    root: str = "/"


def memory_hierarchy(
    mountinfo: str, *, v2_controllers: str | None = None
) -> MemoryHierarchy | None:
    """The memory controller's mount from ``/proc/self/mountinfo``: a v1 mount with
    the ``memory`` option first (a v1 controller is not on v2 as well), else the v2
    mount if ``v2_controllers`` (its ``cgroup.controllers``) lists ``memory``."""
    v1, v2 = _cgroup_mounts(mountinfo)
    return v1 if v1 is not None else _with_memory(v2, v2_controllers)


def host_memory_hierarchy(proc: Path = Path("/proc")) -> MemoryHierarchy | None:
    """This host's memory hierarchy, or None without one."""
    try:
        mountinfo = (proc / "self" / "mountinfo").read_text(encoding="utf-8")
    except OSError:
        return None
    v1, v2 = _cgroup_mounts(mountinfo)
    if v1 is not None or v2 is None:
        return v1
    try:
        controllers = (v2.mount / "cgroup.controllers").read_text(encoding="ascii")
    except OSError:
        return None
    return _with_memory(v2, controllers)


def _cgroup_mounts(mountinfo: str) -> tuple[MemoryHierarchy | None, MemoryHierarchy | None]:
    """The v1 mount with the ``memory`` option, and the first v2 mount (whose
    controllers are not in mountinfo), each None where there is none."""
    v2: MemoryHierarchy | None = None
    for line in mountinfo.splitlines():
        fields = line.split(" - ", 1)
        if len(fields) != 2:
            continue
        mount = fields[0].split()
        after = fields[1].split()
        if len(mount) < 5 or len(after) < 3:
            continue
        kind, options = after[0], after[2].split(",")
        if kind == "cgroup" and "memory" in options:
            return MemoryHierarchy(Path(mount[4]), CgroupVersion.V1, mount[3]), v2
        if kind == "cgroup2" and v2 is None:
            v2 = MemoryHierarchy(Path(mount[4]), CgroupVersion.V2, mount[3])
    return None, v2


def _with_memory(v2: MemoryHierarchy | None, controllers: str | None) -> MemoryHierarchy | None:
    """The v2 mount if its controllers include ``memory``."""
    if v2 is None or controllers is None or "memory" not in controllers.split():
        return None
    return v2


def cgroup_path_of(proc_cgroup: str, version: CgroupVersion) -> str | None:
    """A process's memory cgroup, relative to the hierarchy's mount, from its
    ``/proc/PID/cgroup``: the v1 line naming ``memory``, or v2's ``0::`` line."""
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if version is CgroupVersion.V1 and "memory" in controllers.split(","):
            return path
        if version is CgroupVersion.V2 and parts[0] == "0" and controllers == "":
            return path
    return None


@dataclass(frozen=True)
class MemoryCgroup:
    """One memory cgroup's directory. Every method raises BackendError (a read or
    write the kernel refused, worth trying again) or FatalBackendError (the cgroup is
    gone or not one)."""

    path: Path
    version: CgroupVersion

    @property
    def name(self) -> str:
        return str(self.path)

    def set_limit(self, limit_bytes: int | None) -> None:
        """Cap what its processes hold at ``limit_bytes`` (None: no cap). The kernel
        reclaims down to a lower cap as it is written."""
        if limit_bytes is not None and limit_bytes <= 0:
            raise ValueError(f"a cap must be positive, got {limit_bytes}")
        if self.version is CgroupVersion.V2:
            self._write("memory.high", "max" if limit_bytes is None else str(limit_bytes))
            return
        value = "-1" if limit_bytes is None else str(limit_bytes)
        self._write("memory.limit_in_bytes", value)
        self._write("memory.soft_limit_in_bytes", value)

    def limit_bytes(self) -> int | None:
        """Its cap now, None for none."""
        if self.version is CgroupVersion.V2:
            text = self._read("memory.high")
            return None if text == "max" else _number(text, self.path / "memory.high")
        text = self._read("memory.limit_in_bytes")
        if text == "-1":  # as written; the kernel itself reads back its largest number
            return None
        value = _number(text, self.path / "memory.limit_in_bytes")
        return None if value >= _V1_UNLIMITED_FROM else value

    def usage_bytes(self) -> int:
        """What its processes hold now, as the cgroup charges it."""
        name = "memory.current" if self.version is CgroupVersion.V2 else "memory.usage_in_bytes"
        return _number(self._read(name), self.path / name)

    def swapped_bytes(self) -> int | None:
        """What of its processes' memory is in the host's swap; None if the kernel does
        not account swap per cgroup."""
        if self.version is CgroupVersion.V2:
            try:
                return _number(self._read("memory.swap.current"), self.path / "memory.swap.current")
            except FatalBackendError:
                return None
        for line in self._read("memory.stat", limit=1 << 16).splitlines():
            key, _, value = line.partition(" ")
            if key == "swap":
                return _number(value, self.path / "memory.stat")
        return None

    def join(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into this cgroup."""
        self._write(PROCS_FILE, str(pid))

    def _read(self, name: str, *, limit: int = _MAX_VALUE_CHARS) -> str:
        path = self.path / name
        try:
            with path.open(encoding="ascii") as f:
                text = f.read(limit + 1)
        except FileNotFoundError as exc:
            raise FatalBackendError(f"{path}: no such cgroup file") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise BackendError(f"{path}: {exc}") from exc
        if len(text) > limit:
            raise FatalBackendError(f"{path}: longer than a cgroup value")
        return text.strip()

    def _write(self, name: str, value: str) -> None:
        path = self.path / name
        try:
            path.write_text(value, encoding="ascii")
        except FileNotFoundError as exc:
            raise FatalBackendError(f"{path}: no such cgroup file") from exc
        except OSError as exc:
            # EBUSY: v1 could not reclaim down to the cap; try again next period.
            why = "could not reclaim down to it" if exc.errno == errno.EBUSY else exc.strerror
            raise BackendError(f"{path}: writing {value}: {why}") from exc


def _number(text: str, where: Path) -> int:
    try:
        value = int(text)
    except ValueError:
        raise FatalBackendError(f"{where}: {text[:_MAX_VALUE_CHARS]!r} is not a number") from None
    if value < 0:
        raise FatalBackendError(f"{where}: negative value {value}")
    return value


def vm_cgroup_path(hierarchy: MemoryHierarchy, name: str) -> Path:
    """Where the cgroup of VM ``name`` (a checked VM name) lives, if balloonist made it."""
    return hierarchy.mount / PARENT_NAME / name


def make_parent_cgroup(hierarchy: MemoryHierarchy) -> MemoryCgroup:
    """Make (or reuse) the cgroup the VMs' own cgroups sit in: a cap on it holds all
    of them together. OSError if the host will not let us."""
    path = hierarchy.mount / PARENT_NAME
    path.mkdir(exist_ok=True)
    _hand_down_memory(hierarchy, hierarchy.mount)
    return MemoryCgroup(path, hierarchy.version)


def make_vm_cgroup(hierarchy: MemoryHierarchy, name: str) -> MemoryCgroup:
    """Make (or reuse) VM ``name``'s cgroup; OSError if the host will not let us."""
    parent = make_parent_cgroup(hierarchy)
    path = vm_cgroup_path(hierarchy, name)
    path.mkdir(exist_ok=True)
    _hand_down_memory(hierarchy, parent.path)
    return MemoryCgroup(path, hierarchy.version)


def _hand_down_memory(hierarchy: MemoryHierarchy, parent: Path) -> None:
    """A v2 child gets the memory controller only if its parent hands it down."""
    if hierarchy.version is not CgroupVersion.V2:
        return
    control = parent / "cgroup.subtree_control"
    if "memory" not in control.read_text(encoding="ascii").split():
        control.write_text("+memory", encoding="ascii")


def remove_vm_cgroup(path: Path, *, timeout_s: float = REMOVE_TIMEOUT_S) -> bool:
    """Remove a VM's cgroup once its processes are gone; whether it is gone. A process
    that just exited can keep its cgroup busy until its parent reaps it, so a busy
    cgroup is tried again until ``timeout_s``, then left as it is."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                raise
            if time.monotonic() >= deadline:
                return False
        time.sleep(0.05)


def cgroup_of_process(
    pid: int, hierarchy: MemoryHierarchy, proc: Path = Path("/proc")
) -> MemoryCgroup | None:
    """Process ``pid``'s memory cgroup, or None if it is the hierarchy's root (a cap
    there would be the whole host's) or cannot be read."""
    try:
        text = (proc / str(pid) / "cgroup").read_text(encoding="utf-8")
    except OSError:
        return None
    path = cgroup_path_of(text, hierarchy.version)
    if path is None:
        return None
    root = hierarchy.root.rstrip("/")
    if root and path != root and not path.startswith(root + "/"):
        return None  # outside what this mount shows
    relative = path[len(root) :].strip("/")
    if not relative:
        return None
    return MemoryCgroup(hierarchy.mount / relative, hierarchy.version)


__all__ = [
    "PARENT_NAME",
    "CgroupVersion",
    "MemoryCgroup",
    "MemoryHierarchy",
    "cgroup_of_process",
    "cgroup_path_of",
    "host_memory_hierarchy",
    "make_vm_cgroup",
    "memory_hierarchy",
    "remove_vm_cgroup",
    "vm_cgroup_path",
]
