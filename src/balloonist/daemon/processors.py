"""Processors of real VMs: the daemon's half of the CPU balloon (claims 11 and 19).

When ``[daemon] processors`` names host processors, every agent VM whose vCPUs are
recorded (``vm start --cpus``) shares them: the policy grants each whole processors
(``policy/shares.py``), the VM's agent holds the rest of its vCPUs offline
(``AgentPort.set_cpu_target``), and the daemon narrows the VM's vCPU threads to the
processors it granted (``qemu/affinity.py``). This module holds the pieces that do
not talk to a VM: which processors each VM is granted, its CPU demand from the host's
accounting of its vCPU threads, and the order of the two moves.

**Grants.** Processors go out in blocks, in the order of the VMs' names, each block as
long as the VM's allocation, so no two VMs share a processor. When the allocations add
up to more than the processors (the reservations alone do not fit), every VM gets all
of them and the host time-slices.

**Demand.** A real guest reports no run queue; its vCPU threads' CPU time does tell
how busy its vCPUs were (``/proc/PID/task/TID/stat``): the vCPUs' busy time over the
period's wall time, in vCPUs. It cannot show more than the processors the VM was
granted, so a VM that uses all of its grant counts as fully active: the policy then
splits processors among busy VMs by shares, and takes them from idle ones by the tax.

**Order.** Taking processors: the target goes to the agent first, and the threads are
narrowed only once the guest reports that many vCPUs offline (narrowing first would
squeeze every online vCPU onto too few processors). Giving them back: the threads are
widened first, then the target lowered, so the vCPUs that come online have room.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from balloonist.errors import TransientBackendError
from balloonist.qemu.affinity import PROC_ROOT

CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
#: utime and stime are the 14th and 15th fields of /proc/PID/task/TID/stat.
_UTIME_FIELD: Final = 13


def grants(allocations: Mapping[str, int], processors: Sequence[int]) -> dict[str, frozenset[int]]:
    """Each VM's processors: disjoint blocks in name order (see the module docstring)."""
    if sum(allocations.values()) > len(processors):
        return {name: frozenset(processors) for name in allocations}
    out: dict[str, frozenset[int]] = {}
    start = 0
    for name in sorted(allocations):
        count = allocations[name]
        out[name] = frozenset(processors[start : start + count])
        start += count
    return out


def threads_cpu_s(pid: int, threads: Mapping[int, int], *, proc_root: Path = PROC_ROOT) -> float:
    """CPU seconds the VM's vCPU threads have used, all together, since they started."""
    ticks = 0
    for tid in set(threads.values()):
        path = proc_root / str(pid) / "task" / str(tid) / "stat"
        try:
            text = path.read_text(encoding="ascii", errors="replace")
        except OSError as exc:
            raise TransientBackendError(f"cannot read {path}: {exc.strerror or exc}") from exc
        # The command name (field 2) is in parentheses and may hold spaces.
        fields = text[text.rfind(")") + 2 :].split()
        try:
            ticks += int(fields[_UTIME_FIELD - 2]) + int(fields[_UTIME_FIELD - 1])
        except (IndexError, ValueError):
            raise TransientBackendError(f"{path}: not a thread's stat line") from None
    return ticks / CLK_TCK


@dataclass
class VmProcessors:
    """What the daemon tracks of one VM's processors between periods."""

    vcpus: int
    threads: dict[int, int] | None = None  # cpu-index -> host thread id, from QMP
    sent_reserved: int = 0  # the CPU balloon target last sent
    affinity: frozenset[int] | None = None  # what its threads were last given
    cpu_s: float | None = None  # its threads' CPU time at the last sample
    cpu_s_at: float | None = None  # and when (wall clock)
    demand_vcpus: float | None = None

    def observe(self, cpu_s: float, now_s: float) -> None:
        """Fold in a reading of the threads' CPU time: the demand since the last one."""
        if self.cpu_s is not None and self.cpu_s_at is not None and now_s > self.cpu_s_at:
            busy = (cpu_s - self.cpu_s) / (now_s - self.cpu_s_at)
            self.demand_vcpus = max(0.0, min(float(self.vcpus), busy))
        self.cpu_s, self.cpu_s_at = cpu_s, now_s

    def affinity_for(
        self, grant: frozenset[int], online_vcpus: int, every: frozenset[int]
    ) -> frozenset[int]:
        """The threads' affinity while ``online_vcpus`` are online: the grant once they
        fit on it, else every shared processor (the balloon is still on its way)."""
        return grant if online_vcpus <= len(grant) else every


__all__ = ["VmProcessors", "grants", "threads_cpu_s"]
