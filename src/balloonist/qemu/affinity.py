"""Host processors for a VM: the CPU affinity of QEMU's vCPU threads.

The host's half of the CPU balloon (patent claims 11 and 19). Once the guest's agent
has taken vCPUs offline (``balloonist.agent.cpus``), the VM needs fewer physical
processors; the host *grants* it a set of them by narrowing the affinity of every one
of its vCPU threads to that set (``sched_setaffinity``), and the processors outside
the grant are free for other work. Giving the vCPUs back is the reverse, in the other
order: widen the affinity first, then let the guest bring its vCPUs back online.

QEMU runs each vCPU in a host thread (with KVM, and with multi-threaded TCG);
:meth:`balloonist.qemu.qmp.BalloonQMP.vcpu_threads` says which (QMP
``query-cpus-fast``: cpu-index -> thread id). Only those threads are touched, and only
after checking that each is a thread of the QEMU process (``/proc/PID/task/TID``): a
stale or wrong thread id must never move some other program's thread. All of them are
checked before any is changed. The window between that check and the system call is
the usual one for thread ids, which Linux does not reuse until its id space wraps.

Errors are the project's: a bad grant (empty, or not processor numbers) is
:class:`ConfigError`; a thread or process that is not there, or a kernel refusal, is
a backend error: :class:`TransientBackendError` for a thread that went away while we
worked (asking QEMU again may help), :class:`FatalBackendError` for everything that
will not change on a retry (not QEMU's thread, not permitted, no usable processor in
the grant).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping, Set
from pathlib import Path
from typing import Final

from balloonist.errors import (
    BackendError,
    ConfigError,
    FatalBackendError,
    TransientBackendError,
)

PROC_ROOT: Final = Path("/proc")
#: Host processor numbers are below this (Linux's largest NR_CPUS on x86-64).
MAX_HOST_CPUS: Final = 8192


def _check_threads(pid: int, threads: Mapping[int, int], proc_root: Path) -> None:
    """Raise unless the process exists and every thread id is one of its threads."""
    if pid < 1 or not (proc_root / str(pid)).is_dir():
        raise FatalBackendError(f"QEMU process {pid} is not running")
    tasks = proc_root / str(pid) / "task"
    for index, tid in threads.items():
        if tid < 1 or not (tasks / str(tid)).is_dir():
            raise FatalBackendError(
                f"vCPU {index}'s thread {tid} is not a thread of QEMU process {pid}; "
                "no thread was changed"
            )


def _os_error(what: str, exc: OSError) -> BackendError:
    text = f"{what}: {exc.strerror or exc}"
    if exc.errno == errno.ESRCH:
        return TransientBackendError(f"{text} (the thread went away)")
    return FatalBackendError(text)


def vcpu_affinity(
    pid: int, threads: Mapping[int, int], *, proc_root: Path = PROC_ROOT
) -> dict[int, frozenset[int]]:
    """cpu-index -> the host processors that vCPU's thread may run on now."""
    _check_threads(pid, threads, proc_root)
    out: dict[int, frozenset[int]] = {}
    for index, tid in sorted(threads.items()):
        try:
            out[index] = frozenset(os.sched_getaffinity(tid))
        except OSError as exc:
            raise _os_error(f"reading vCPU {index}'s affinity (thread {tid})", exc) from exc
    return out


def set_vcpu_affinity(
    pid: int,
    threads: Mapping[int, int],
    masks: Mapping[int, Set[int]],
    *,
    proc_root: Path = PROC_ROOT,
) -> dict[int, frozenset[int]]:
    """Give each vCPU in ``masks`` (cpu-index -> host processors) that affinity.

    ``threads`` is :meth:`~balloonist.qemu.qmp.BalloonQMP.vcpu_threads`. Returns the
    affinity of every vCPU in ``masks`` as the kernel has it afterwards (it may keep
    out processors a cpuset forbids). If a call fails part way, the vCPUs before it
    have their new affinity and the error says which one failed.
    """
    for index, mask in masks.items():
        if index not in threads:
            raise ConfigError(f"no vCPU {index} among {sorted(threads)}")
        if not mask:
            raise ConfigError(f"vCPU {index}: an empty set of host processors")
        if any(
            not isinstance(cpu, int) or isinstance(cpu, bool) or not 0 <= cpu < MAX_HOST_CPUS
            for cpu in mask
        ):
            raise ConfigError(f"vCPU {index}: not host processor numbers: {sorted(mask)[:8]}")
    chosen = {index: threads[index] for index in masks}
    _check_threads(pid, chosen, proc_root)
    for index, tid in sorted(chosen.items()):
        try:
            os.sched_setaffinity(tid, masks[index])
        except OSError as exc:
            what = f"setting vCPU {index}'s affinity (thread {tid}) to {sorted(masks[index])}"
            raise _os_error(what, exc) from exc
    try:
        return vcpu_affinity(pid, chosen, proc_root=proc_root)
    except FatalBackendError as exc:  # a thread checked a moment ago is gone
        raise TransientBackendError(f"after setting the affinity: {exc}") from exc


def narrow_vcpu_affinity(
    pid: int, threads: Mapping[int, int], host_cpus: Set[int], *, proc_root: Path = PROC_ROOT
) -> dict[int, frozenset[int]]:
    """Every vCPU thread of the VM onto ``host_cpus`` (the grant); returns the read-back."""
    return set_vcpu_affinity(
        pid, threads, {index: host_cpus for index in threads}, proc_root=proc_root
    )


__all__ = [
    "MAX_HOST_CPUS",
    "PROC_ROOT",
    "narrow_vcpu_affinity",
    "set_vcpu_affinity",
    "vcpu_affinity",
]
