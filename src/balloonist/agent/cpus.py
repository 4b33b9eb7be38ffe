"""The CPU balloon inside a Linux guest: vCPUs taken offline through sysfs CPU hotplug.

The patent's claims 11 and 19: a balloon may reserve processors as well as memory. The
agent takes a vCPU out of the guest by writing ``0`` to
``/sys/devices/system/cpu/cpuN/online``; Linux's own scheduler then moves every task
and interrupt off it, which is the point: the guest decides how to live with fewer
processors, and the host can reuse the physical processors behind the vCPUs the
balloon holds (:mod:`balloonist.qemu.affinity` narrows the VM's vCPU threads to what
it still gets). Writing ``1`` gives the vCPU back.

Two layers, like the memory balloon's kernel port and driver:

- :class:`CpuHotplug` reads and writes sysfs under an injectable root (tests use a fake
  directory tree). A vCPU is *hotpluggable* if it is present and has an ``online``
  file; cpu0 on x86 usually has none and is never chosen. Whether a hotpluggable vCPU
  is online is what its own ``online`` file says; for the others, the ``online`` list.
- :class:`CpuBalloon` is the balloon: a stack of the vCPUs it took offline. It takes
  the highest-numbered online hotpluggable vCPU first, gives back the most recently
  taken first, and never takes the last online vCPU. It writes the stack to a state
  file after every change: unlike pinned pages, which the kernel takes back when the
  agent dies, an offline vCPU stays offline, so a restarted agent (after a crash, or
  the OOM killer, which is told to take the agent first) must find the ones it held.

Every file read is bounded (``MAX_SYSFS_FILE_BYTES``) and every CPU number is checked
against ``MAX_CPU_ID``: the guest's own kernel is trusted, but a strange file must not
make the agent parse without end. Failures are backend errors: writes the kernel
refused for now (``EBUSY``, ``EAGAIN``, ``EINTR``) are :class:`TransientBackendError`,
anything else :class:`FatalBackendError`. Stdlib only, Python 3.9.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from pathlib import Path

from balloonist.errors import (
    BackendError,
    ConfigError,
    FatalBackendError,
    TransientBackendError,
)

log = logging.getLogger("balloonist.agent")

SYSFS_CPU_ROOT = Path("/sys/devices/system/cpu")
#: The CPU balloon's state file: on a tmpfs, so it goes at reboot, when every vCPU
#: comes back up anyway.
STATE_PATH = Path("/run/balloonist-agent.cpus")
#: Linux's largest NR_CPUS on x86-64 (CONFIG_MAXSMP) is 8192: CPU numbers below it.
MAX_CPU_ID = 8191
#: A list of every one of 8192 CPUs, one by one, is about 40 KB; nothing real is longer.
MAX_SYSFS_FILE_BYTES = 64 * 1024
#: errno values that mean "not now", worth trying again on a later step.
_TRANSIENT_ERRNOS = frozenset({errno.EBUSY, errno.EAGAIN, errno.EINTR})


class CpuTargetError(ConfigError):
    """A CPU balloon target this guest cannot meet (it would take the last vCPU, or
    more vCPUs than can go offline); the balloon stays as it is."""


def parse_cpu_list(text: str, *, where: str = "cpu list") -> frozenset[int]:
    """Linux's CPU list format (``0-3,5,7-8``; empty for none) as a set of CPU numbers.

    Raises FatalBackendError for anything else, or for a number above MAX_CPU_ID.
    """
    cpus: set[int] = set()
    text = text.strip()
    if not text:
        return frozenset()
    for part in text.split(","):
        first, dash, last = part.partition("-")
        lo, hi = _cpu_number(first, where), _cpu_number(last, where) if dash else None
        if hi is None:
            cpus.add(lo)
        elif lo <= hi:
            cpus.update(range(lo, hi + 1))
        else:
            raise FatalBackendError(f"{where}: backwards range {part[:40]!r}")
    return frozenset(cpus)


def _cpu_number(text: str, where: str) -> int:
    if not text.isdigit() or not text.isascii() or len(text) > len(str(MAX_CPU_ID)):
        raise FatalBackendError(f"{where}: not a CPU number: {text[:40]!r}")
    number = int(text)
    if number > MAX_CPU_ID:
        raise FatalBackendError(f"{where}: CPU {number} above {MAX_CPU_ID}")
    return number


def _parse_stack(text: str, *, where: str) -> list[int]:
    """The state file: CPU numbers in the order taken, comma-separated, each once."""
    text = text.strip()
    stack = [_cpu_number(part, where) for part in text.split(",")] if text else []
    if len(set(stack)) != len(stack):
        raise FatalBackendError(f"{where}: a CPU listed twice")
    return stack


def format_cpu_list(cpus: frozenset[int] | set[int] | tuple[int, ...]) -> str:
    """The inverse of :func:`parse_cpu_list`, for log lines: ``{0, 1, 2, 5}`` -> ``0-2,5``."""
    parts: list[str] = []
    ordered = sorted(cpus)
    start = 0
    for i, cpu in enumerate(ordered):
        if i + 1 < len(ordered) and ordered[i + 1] == cpu + 1:
            continue
        first = ordered[start]
        parts.append(str(first) if first == cpu else f"{first}-{cpu}")
        start = i + 1
    return ",".join(parts) or "none"


def _backend_error(message: str, exc: OSError) -> BackendError:
    what = f"{message}: {exc.strerror or exc}"
    if exc.errno in _TRANSIENT_ERRNOS:
        return TransientBackendError(what)
    return FatalBackendError(what)


class CpuHotplug:
    """Linux CPU hotplug through sysfs, under ``root`` (``/sys/devices/system/cpu``)."""

    def __init__(self, root: Path = SYSFS_CPU_ROOT) -> None:
        self.root = root

    def _read(self, path: Path) -> str:
        try:
            with path.open("rb") as f:
                return f.read(MAX_SYSFS_FILE_BYTES).decode("ascii", errors="replace")
        except OSError as exc:
            raise _backend_error(f"cannot read {path}", exc) from exc

    def _list(self, name: str) -> frozenset[int]:
        return parse_cpu_list(self._read(self.root / name), where=str(self.root / name))

    def possible(self) -> frozenset[int]:
        """CPUs the kernel could ever bring up (``possible``)."""
        return self._list("possible")

    def present(self) -> frozenset[int]:
        """CPUs the machine has now (``present``)."""
        return self._list("present")

    def hotpluggable(self) -> frozenset[int]:
        """Present CPUs with an ``online`` file: the ones that can be taken offline."""
        return frozenset(cpu for cpu in self.present() if self._online_file(cpu).exists())

    def online(self) -> frozenset[int]:
        """CPUs online now: a hotpluggable CPU by its own file, any other by the list."""
        online = {cpu for cpu in self._list("online") if not self._online_file(cpu).exists()}
        online.update(cpu for cpu in self.hotpluggable() if self.is_online(cpu))
        return frozenset(online)

    def is_online(self, cpu: int) -> bool:
        """What ``cpuN/online`` says (``1`` or ``0``)."""
        path = self._online_file(cpu)
        value = self._read(path).strip()
        if value not in ("0", "1"):
            raise FatalBackendError(f"{path}: expected 0 or 1, got {value[:40]!r}")
        return value == "1"

    def set_online(self, cpu: int, online: bool) -> None:
        """Bring ``cpu`` up or take it down; returns once the kernel has done it."""
        path = self._online_file(cpu)
        try:
            # Unbuffered, so the kernel's refusal comes back from this write itself.
            with path.open("wb", buffering=0) as f:
                f.write(b"1" if online else b"0")
        except OSError as exc:
            what = "bring" if online else "take"
            where = "online" if online else "offline"
            raise _backend_error(f"cannot {what} cpu{cpu} {where} ({path})", exc) from exc

    def _online_file(self, cpu: int) -> Path:
        if not 0 <= cpu <= MAX_CPU_ID:
            raise ValueError(f"no such CPU number {cpu}")
        return self.root / f"cpu{cpu}" / "online"


@dataclass(frozen=True)
class CpuView:
    """Which vCPUs are online, and which the balloon holds, as the guest's report says."""

    online: tuple[int, ...]
    reserved: tuple[int, ...]


class CpuBalloon:
    """The vCPUs this agent took offline: a stack, the most recently taken on top.

    ``state_path`` (None: no state file) holds the stack, written after every change
    and read back by :meth:`adopt` when an agent starts.
    """

    def __init__(self, hotplug: CpuHotplug, state_path: Path | None = None) -> None:
        self.hotplug = hotplug
        self.state_path = state_path
        self._held: list[int] = []
        self._save_failed = False

    @property
    def held(self) -> tuple[int, ...]:
        """The vCPUs the balloon holds, in the order it took them."""
        return tuple(self._held)

    def adopt(self) -> list[int]:
        """Take over the vCPUs an earlier agent held (its state file) that are still
        offline and hotpluggable; return them. A missing or unreadable file adopts
        nothing (a warning for the second)."""
        if self.state_path is None:
            return []
        try:
            with self.state_path.open("rb") as f:
                text = f.read(MAX_SYSFS_FILE_BYTES).decode("ascii", errors="replace")
            earlier = _parse_stack(text, where=str(self.state_path))
        except FileNotFoundError:
            return []
        except (OSError, FatalBackendError) as exc:
            log.warning("ignoring the CPU balloon's state file: %s", exc)
            return []
        hotpluggable = self.hotplug.hotpluggable()
        adopted = [
            cpu for cpu in earlier if cpu in hotpluggable and not self.hotplug.is_online(cpu)
        ]
        self._held = adopted + [cpu for cpu in self._held if cpu not in adopted]
        self._save()
        return adopted

    def _save(self) -> None:
        """Write the stack to the state file (removed when empty); never raises."""
        if self.state_path is None:
            return
        try:
            if not self._held:
                self.state_path.unlink(missing_ok=True)
            else:
                staging = self.state_path.with_name(self.state_path.name + ".new")
                staging.write_text(",".join(str(cpu) for cpu in self._held) + "\n")
                staging.replace(self.state_path)
            self._save_failed = False
        except OSError as exc:
            if not self._save_failed:  # one line per run of failures
                log.warning("cannot write the CPU balloon's state file: %s", exc)
            self._save_failed = True

    def view(self) -> CpuView:
        return CpuView(tuple(sorted(self.hotplug.online())), tuple(sorted(self._held)))

    def check_target(self, target: int) -> None:
        """Raise CpuTargetError unless the balloon can hold ``target`` vCPUs.

        It refuses to leave no vCPU online, and to need more vCPUs than are online and
        hotpluggable (cpu0 without an ``online`` file, say).
        """
        if target < 0:
            raise CpuTargetError(f"cannot reserve {target} vCPUs")
        online = self.hotplug.online()
        held = len(self._held)
        if target >= held + len(online):
            raise CpuTargetError(
                f"reserving {target} of {held + len(online)} vCPUs would leave none online"
            )
        takeable = len((online & self.hotplug.hotpluggable()) - set(self._held))
        if target - held > takeable:
            raise CpuTargetError(
                f"cannot reserve {target} vCPUs: {held} reserved and only {takeable} more can"
                f" go offline (online {format_cpu_list(online)}; cpu0 is often not hotpluggable)"
            )

    def reserve(self, count: int) -> list[int]:
        """Take up to ``count`` vCPUs offline, highest-numbered first; return them.

        Fewer than ``count`` means no more could go (never the last online vCPU). A
        refused write raises a BackendError; the vCPUs taken before it stay held.
        """
        online = set(self.hotplug.online())
        candidates = sorted((online & self.hotplug.hotpluggable()) - set(self._held), reverse=True)
        taken: list[int] = []
        for cpu in candidates[: max(0, count)]:
            if len(online) <= 1:
                break  # the last online vCPU stays
            self.hotplug.set_online(cpu, False)
            if self.hotplug.is_online(cpu):
                raise TransientBackendError(f"cpu{cpu} is still online after going offline")
            online.discard(cpu)
            self._held.append(cpu)
            self._save()
            taken.append(cpu)
        return taken

    def release(self, count: int) -> list[int]:
        """Bring up to ``count`` held vCPUs back online, most recently taken first.

        A refused write raises a BackendError; that vCPU and those under it stay held.
        """
        released: list[int] = []
        while self._held and len(released) < count:
            cpu = self._held[-1]
            self.hotplug.set_online(cpu, True)
            if not self.hotplug.is_online(cpu):
                raise TransientBackendError(f"cpu{cpu} is still offline after coming online")
            self._held.pop()
            self._save()
            released.append(cpu)
        return released

    def forget_taken_back(self) -> list[int]:
        """Drop held vCPUs someone else brought back online (or that are gone); return them."""
        if not self._held:
            return []
        hotpluggable = self.hotplug.hotpluggable()
        gone = [cpu for cpu in self._held if cpu not in hotpluggable or self.hotplug.is_online(cpu)]
        if gone:
            self._held = [cpu for cpu in self._held if cpu not in gone]
            self._save()
        return gone


__all__ = [
    "MAX_CPU_ID",
    "STATE_PATH",
    "SYSFS_CPU_ROOT",
    "CpuBalloon",
    "CpuHotplug",
    "CpuTargetError",
    "CpuView",
    "format_cpu_list",
    "parse_cpu_list",
]
