"""The CPU balloon: a host's processors shared among guests' vCPUs, quantum by quantum.

The patent's claims 11 and 19 apply the balloon scheme to processors: a CPU balloon in
each guest reserves some of its vCPUs (takes them offline), so that the guest OS, which
knows what its tasks are doing, multiplexes them on the vCPUs it still has, instead of
the host time-slicing more vCPUs than it has processors without knowing what runs on
them. This module models one host of ``P`` physical processors and its guests; it is
standalone (no memory), and :class:`CpuHost` is its whole public face.

The model, one host quantum (``CpuCosts.quantum_s``, 10 ms) at a time:

1. **Guest OS.** A guest has ``threads`` tasks. A task is runnable or sleeping by its
   workload: ``cpu-bound`` always runnable; ``bursty`` on and off in turn, with
   exponential on and off times (mean on ``burst_s``, mean off
   ``burst_s * (1 - duty) / duty``, so the long-run on fraction is ``duty``), drawn
   from the guest's own seeded stream and switched at quantum boundaries;
   ``parallel`` always runnable, in barrier-synchronised rounds (rule 3); ``idle``
   never. The guest puts its runnable tasks on its online vCPUs, the lowest-numbered
   (the balloon reserves the highest). With more runnable tasks than online vCPUs it
   time-slices them round-robin at no loss: it knows what it runs, and a guest's
   own context switches are cheap next to a host quantum. Offline vCPUs run nothing.
   A vCPU with a task is *busy* and wants a processor; an idle one halts and does not.
2. **Host.** If the busy vCPUs fit on the ``P`` processors, all run. Otherwise the host
   time-slices them by proportional share: each busy guest is entitled to
   ``P * shares / (sum of busy guests' shares)`` processors, capped at its busy vCPUs,
   the surplus of a capped guest going to the others (water-filling); entitlements
   accumulate as credit, and each quantum the ``P`` processors go one at a time to the
   guest with the most credit that has a busy vCPU left (ties to the lower index),
   each taking one processor's worth off its credit. Within a guest its share is split
   evenly among its busy vCPUs by taking them in rotation. This is deterministic and
   keeps every guest within a couple of quanta of its share (credit is bounded by
   ``CREDIT_CAP_SLOTS`` and dropped while a guest has nothing to run, so nobody banks
   time). A running vCPU stays on the processor it ran on last if that processor's
   cache is still its own; otherwise it takes the lowest free processor, and if that
   processor last ran another vCPU, the vCPU first loses ``switch_cost_s`` refilling
   the cache. An idle quantum does not evict a processor's cache, and a processor's
   first vCPU pays nothing (no one else's cache to replace).
3. **Parallel jobs.** In each round every thread must do ``work_per_round_cpu_s`` of
   work; the round ends when the last one is done, and the next starts at once. With
   at least as many online vCPUs as threads, thread ``i`` has vCPU ``i`` to itself. A
   thread that has done its part spins at the barrier, keeping its vCPU busy: it
   cannot see the host descheduling its siblings, so it spins rather than blocks, and
   whatever processor time that vCPU gets is ``spin_cpu_s``. Rounds are resolved
   exactly within a quantum (a barrier can complete mid-quantum), so a guest that
   gets all its vCPUs all the time never spins. With fewer online vCPUs than threads
   the guest multiplexes the threads itself and a thread waiting at the barrier
   blocks (the guest knows its siblings are not running), so there is no spin: all
   the processor time the guest gets goes to the round's remaining work, as if
   shared evenly among its threads.

Useful work (``useful_cpu_s``) is processor time spent on a task's own work; a guest's
``ran_cpu_s`` is exactly its useful plus spin plus switch-lost time.

Simplifications, stated plainly:

- **Spinning is all or nothing.** Real barriers and locks spin for a while and then
  block, and real guests' paravirtual spinlocks can yield to the host; here a thread
  with its own vCPU always spins and a multiplexed one never does. The model captures
  lock-holder (and barrier-straggler) preemption as "the waiters burn what the host
  gives them", not the finer trade-offs of spin-then-block.
- **The guest's own multiplexing is free and perfectly fair.** No guest context switch
  costs, no cache loss inside the guest, and a multiplexed parallel job's round ends
  when its total work is done, with no tail where one thread is left on one vCPU.
- **Caches are per vCPU and all or nothing.** A processor holds the cache of the last
  vCPU it ran, and a different vCPU loses the same fixed time; shared caches, NUMA,
  partly warm caches and the gain of co-running siblings are not modelled.
- **Whole quanta.** The host schedules whole quanta, a bursty task's on and off
  switches at quantum boundaries, and its on/off times follow wall-clock time, not its
  progress (a starved bursty task does not stretch its bursts).
- **No host overhead, no interrupts, no I/O.** Processors spend nothing on the host's
  own scheduling, and nothing wakes a halted vCPU early.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, get_args

import numpy as np
import numpy.typing as npt
from numba import njit

from balloonist.errors import ConfigError

__all__ = [
    "DEFAULT_QUANTUM_S",
    "DEFAULT_SWITCH_COST_S",
    "MIN_BURST_S",
    "CpuCosts",
    "CpuGuest",
    "CpuHost",
    "CpuPeriod",
    "CpuWorkload",
    "CpuWorkloadKind",
]

CpuWorkloadKind = Literal["idle", "cpu-bound", "bursty", "parallel"]

# Codes shared with the compiled loop; do not renumber.
_IDLE: Final = 0
_CPU_BOUND: Final = 1
_BURSTY: Final = 2
_PARALLEL: Final = 3
_KIND_CODES: Final[dict[str, int]] = {
    "idle": _IDLE,
    "cpu-bound": _CPU_BOUND,
    "bursty": _BURSTY,
    "parallel": _PARALLEL,
}

# Host schedulers slice in milliseconds to tens of them (Xen's credit scheduler: 30 ms).
DEFAULT_QUANTUM_S: Final = 0.01
# Refilling a cache-filling working set from memory: a few MiB of L2/L3 at 64 B lines
# is some 30-60 thousand misses at ~80 ns with a little overlap, i.e. about 1 ms, the
# expensive end of indirect context-switch costs. It is 10 % of the default quantum,
# enough to show the loss without it drowning everything else. An order of magnitude,
# not a measurement, like the memory costs in docs/simulator.md.
DEFAULT_SWITCH_COST_S: Final = 0.001
# Credit (in processor-quanta) a guest may be owed or owe: enough for the largest-credit
# rule to even out rounding, small enough that no guest builds up a burst.
CREDIT_CAP_SLOTS: Final = 2.0
# Shorter bursts than this say nothing a quantum-level model can show, and would only
# spin the on/off loop many times per quantum.
MIN_BURST_S: Final = 1e-4
# Periods must be whole quanta; this much relative slack absorbs float division.
_WHOLE_QUANTA_TOLERANCE: Final = 1e-9
# Salt so a guest's CPU stream differs from its memory stream for the same seed.
_CPU_STREAM_SALT: Final = 0xC2B2AE3D27D4EB4F


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class CpuWorkload:
    """What a guest's tasks do. Per-kind fields are required for their kind, refused
    for the others (``None`` means not given):

    - ``bursty``: ``duty`` in (0, 1], the long-run fraction of time each task is
      runnable, and ``burst_s`` >= ``MIN_BURST_S`` (0.1 ms), the mean length of a runnable burst;
    - ``parallel``: ``work_per_round_cpu_s`` > 0, each thread's work per round.

    ``threads`` must be at least 1, except for ``idle``, which has none runnable
    whatever it says.
    """

    kind: CpuWorkloadKind
    threads: int = 1
    duty: float | None = None
    burst_s: float | None = None
    work_per_round_cpu_s: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KIND_CODES:
            choices = ", ".join(get_args(CpuWorkloadKind))
            raise ConfigError(f"CpuWorkload.kind must be one of {choices}, got {self.kind!r}")
        low = 0 if self.kind == "idle" else 1
        if not _is_int(self.threads) or self.threads < low:
            raise ConfigError(
                f"CpuWorkload.threads must be a whole number >= {low} for kind "
                f"{self.kind!r}, got {self.threads!r}"
            )
        wanted = {"bursty": {"duty", "burst_s"}, "parallel": {"work_per_round_cpu_s"}}.get(
            self.kind, set()
        )
        for name in ("duty", "burst_s", "work_per_round_cpu_s"):
            value = getattr(self, name)
            if name in wanted and value is None:
                raise ConfigError(f"CpuWorkload.{name} is required for kind {self.kind!r}")
            if name not in wanted and value is not None:
                raise ConfigError(f"CpuWorkload.{name} is not a parameter of kind {self.kind!r}")
            if value is not None and not _is_real(value):
                raise ConfigError(f"CpuWorkload.{name} must be a finite number, got {value!r}")
        if self.duty is not None and not 0.0 < self.duty <= 1.0:
            raise ConfigError(f"CpuWorkload.duty must be in (0, 1], got {self.duty!r}")
        if self.burst_s is not None and self.burst_s < MIN_BURST_S:
            raise ConfigError(f"CpuWorkload.burst_s must be >= {MIN_BURST_S}, got {self.burst_s!r}")
        if self.work_per_round_cpu_s is not None and self.work_per_round_cpu_s <= 0.0:
            raise ConfigError(
                f"CpuWorkload.work_per_round_cpu_s must be > 0, got {self.work_per_round_cpu_s!r}"
            )

    @classmethod
    def idle(cls) -> CpuWorkload:
        return cls("idle", threads=0)

    @classmethod
    def cpu_bound(cls, threads: int) -> CpuWorkload:
        return cls("cpu-bound", threads=threads)

    @classmethod
    def bursty(cls, threads: int, duty: float, burst_s: float) -> CpuWorkload:
        return cls("bursty", threads=threads, duty=duty, burst_s=burst_s)

    @classmethod
    def parallel(cls, threads: int, work_per_round_cpu_s: float) -> CpuWorkload:
        return cls("parallel", threads=threads, work_per_round_cpu_s=work_per_round_cpu_s)


@dataclass(frozen=True)
class CpuGuest:
    name: str
    vcpus: int
    shares: int
    workload: CpuWorkload

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"CpuGuest.name must be a non-empty string, got {self.name!r}")
        if not _is_int(self.vcpus) or self.vcpus < 1:
            raise ConfigError(f"CpuGuest.vcpus must be a whole number >= 1, got {self.vcpus!r}")
        if not _is_int(self.shares) or self.shares < 1:
            raise ConfigError(f"CpuGuest.shares must be a whole number >= 1, got {self.shares!r}")
        if not isinstance(self.workload, CpuWorkload):
            raise ConfigError(f"CpuGuest.workload must be a CpuWorkload, got {self.workload!r}")


@dataclass(frozen=True)
class CpuCosts:
    quantum_s: float = DEFAULT_QUANTUM_S
    switch_cost_s: float = DEFAULT_SWITCH_COST_S

    def __post_init__(self) -> None:
        if not _is_real(self.quantum_s) or self.quantum_s <= 0.0:
            raise ConfigError(f"CpuCosts.quantum_s must be > 0, got {self.quantum_s!r}")
        # a switch that cost the whole quantum would leave the vCPU nothing to run
        if not _is_real(self.switch_cost_s) or not 0.0 <= self.switch_cost_s < self.quantum_s:
            raise ConfigError(
                f"CpuCosts.switch_cost_s must be in [0, quantum_s = {self.quantum_s}), "
                f"got {self.switch_cost_s!r}"
            )


@dataclass(frozen=True)
class CpuPeriod:
    """One period of the host, per guest in guest order (CPU-seconds unless named).

    ``ran_cpu_s`` is the processor time the guest's vCPUs got; it is exactly
    ``useful_cpu_s + spin_cpu_s + switch_lost_cpu_s``. ``demand_vcpus`` is the
    time-average number of the guest's runnable tasks, capped at its vCPUs: what it
    would use with every vCPU online, whatever its balloon holds. ``online_vcpus`` is
    the balloon state the period ran with. ``busy_cpu_s`` is the host's total.
    """

    start_s: float
    period_s: float
    online_vcpus: tuple[int, ...]
    useful_cpu_s: tuple[float, ...]
    demand_vcpus: tuple[float, ...]
    ran_cpu_s: tuple[float, ...]
    spin_cpu_s: tuple[float, ...]
    switch_lost_cpu_s: tuple[float, ...]
    busy_cpu_s: float


class CpuHost:
    """``physical_cpus`` processors shared by ``guests``; each guest's CPU balloon is
    its count of online vCPUs (all online at the start). State (tasks, credits, which
    processor holds whose cache) carries over from one :meth:`run` to the next, so
    periods must follow each other without gaps."""

    def __init__(
        self, physical_cpus: int, guests: Sequence[CpuGuest], costs: CpuCosts, seed: int
    ) -> None:
        if not _is_int(physical_cpus) or physical_cpus < 1:
            raise ConfigError(f"physical_cpus must be a whole number >= 1, got {physical_cpus!r}")
        if not _is_int(seed):
            raise ConfigError(f"seed must be a whole number, got {seed!r}")
        for i, g in enumerate(guests):
            if not isinstance(g, CpuGuest):
                raise ConfigError(f"guests[{i}] must be a CpuGuest, got {g!r}")
        names = [g.name for g in guests]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ConfigError(f"guests[{i}].name: duplicate guest name {name!r}")
        self.physical_cpus: Final = physical_cpus
        self.guests: Final = tuple(guests)
        self.costs: Final = costs
        self._now_s: float | None = None

        n = len(self.guests)
        wl = [g.workload for g in self.guests]
        self._kind = np.array([_KIND_CODES[w.kind] for w in wl], dtype=np.int64)
        self._threads = np.array([w.threads for w in wl], dtype=np.int64)
        self._vcpus = np.array([g.vcpus for g in self.guests], dtype=np.int64)
        self._online = self._vcpus.copy()
        self._shares = np.array([g.shares for g in self.guests], dtype=np.float64)
        duty = np.array([w.duty or 1.0 for w in wl], dtype=np.float64)
        burst_s = np.array([w.burst_s or 1.0 for w in wl], dtype=np.float64)
        self._on_mean_s = burst_s
        self._off_mean_s = burst_s * (1.0 - duty) / duty
        self._round_cpu_s = np.array([w.work_per_round_cpu_s or 0.0 for w in wl], np.float64)
        self._vcpu_off = np.concatenate(([0], np.cumsum(self._vcpus))).astype(np.int64)
        self._thread_off = np.concatenate(([0], np.cumsum(self._threads))).astype(np.int64)

        # Seeded per guest so one guest's stream never depends on another's.
        self._rng = np.array(
            [
                ((seed * 0x9E3779B97F4A7C15 + (i + 1) * 0xBF58476D1CE4E5B9) % 2**64)
                ^ _CPU_STREAM_SALT
                or 1
                for i in range(n)
            ],
            dtype=np.uint64,
        )
        n_threads = int(self._thread_off[-1])
        self._task_on = np.zeros(n_threads, dtype=np.int64)
        self._task_left_s = np.zeros(n_threads, dtype=np.float64)
        self._work_left_cpu_s = np.zeros(n_threads, dtype=np.float64)
        _init_tasks(
            self._kind,
            self._thread_off,
            duty,
            self._on_mean_s,
            self._off_mean_s,
            self._round_cpu_s,
            self._rng,
            self._task_on,
            self._task_left_s,
            self._work_left_cpu_s,
        )
        self._credit = np.zeros(n, dtype=np.float64)
        self._rotor = np.zeros(n, dtype=np.int64)
        self._vcpu_pcpu = np.full(int(self._vcpu_off[-1]), -1, dtype=np.int64)
        self._pcpu_vcpu = np.full(physical_cpus, -1, dtype=np.int64)

    def _check_guest(self, guest: int) -> None:
        if not _is_int(guest) or not 0 <= guest < len(self.guests):
            raise ConfigError(f"guest index must be in [0, {len(self.guests)}), got {guest!r}")

    def set_online(self, guest: int, online_vcpus: int) -> None:
        """Set the CPU balloon of guest ``guest``: ``vcpus - online_vcpus`` are reserved."""
        self._check_guest(guest)
        g = self.guests[guest]
        if not _is_int(online_vcpus) or not 1 <= online_vcpus <= g.vcpus:
            raise ConfigError(
                f"online_vcpus for guest {g.name!r} must be a whole number in "
                f"[1, {g.vcpus}] (its vcpus), got {online_vcpus!r}"
            )
        self._online[guest] = online_vcpus

    def online(self, guest: int) -> int:
        self._check_guest(guest)
        return int(self._online[guest])

    def set_shares(self, guest: int, shares: int) -> None:
        """A live change of a guest's CPU shares: the host's time-slicing weighs it so
        from the next quantum on."""
        self._check_guest(guest)
        if not _is_int(shares) or shares < 1:
            raise ConfigError(f"shares must be a whole number >= 1, got {shares!r}")
        self._shares[guest] = float(shares)

    def run(self, start_s: float, period_s: float) -> CpuPeriod:
        """Run ``[start_s, start_s + period_s)``, a whole number of quanta, which must
        start where the previous period ended. Deterministic for a seed."""
        if not _is_real(start_s):
            raise ConfigError(f"start_s must be a finite number, got {start_s!r}")
        if not _is_real(period_s) or period_s <= 0.0:
            raise ConfigError(f"period_s must be > 0, got {period_s!r}")
        quantum_s = self.costs.quantum_s
        quanta = round(period_s / quantum_s)
        if quanta < 1 or abs(quanta * quantum_s - period_s) > _WHOLE_QUANTA_TOLERANCE * period_s:
            raise ConfigError(
                f"period_s ({period_s}) must be a whole number of quanta (quantum_s = {quantum_s})"
            )
        if self._now_s is not None and not math.isclose(
            start_s, self._now_s, rel_tol=1e-12, abs_tol=1e-9
        ):
            raise ConfigError(
                f"start_s ({start_s}) must be where the previous period ended ({self._now_s})"
            )
        n = len(self.guests)
        out = np.zeros((5, n), dtype=np.float64)
        _run_quanta(
            quanta,
            quantum_s,
            self.costs.switch_cost_s,
            self.physical_cpus,
            self._kind,
            self._threads,
            self._vcpus,
            self._online,
            self._shares,
            self._on_mean_s,
            self._off_mean_s,
            self._round_cpu_s,
            self._vcpu_off,
            self._thread_off,
            self._rng,
            self._task_on,
            self._task_left_s,
            self._work_left_cpu_s,
            self._credit,
            self._rotor,
            self._vcpu_pcpu,
            self._pcpu_vcpu,
            out,
        )
        self._now_s = start_s + period_s
        useful, demand, ran, spin, switch = (tuple(float(x) for x in row) for row in out)
        return CpuPeriod(
            start_s=start_s,
            period_s=period_s,
            online_vcpus=tuple(int(x) for x in self._online),
            useful_cpu_s=useful,
            demand_vcpus=tuple(d / period_s for d in demand),
            ran_cpu_s=ran,
            spin_cpu_s=spin,
            switch_lost_cpu_s=switch,
            busy_cpu_s=float(sum(ran)),
        )


# --------------------------------------------------------------------------------------
# The compiled loop. Rows of ``out``: useful, demand (vCPU-seconds), ran, spin, switch.

_OUT_USEFUL: Final = 0
_OUT_DEMAND: Final = 1
_OUT_RAN: Final = 2
_OUT_SPIN: Final = 3
_OUT_SWITCH: Final = 4


@njit(cache=True, inline="always")
def _rand_unit(rng: npt.NDArray[np.uint64], g: int) -> float:
    """xorshift64* on the guest's own state; the top 53 bits as a float in [0, 1)."""
    x = rng[g]
    x ^= x >> np.uint64(12)
    x ^= x << np.uint64(25)
    x ^= x >> np.uint64(27)
    rng[g] = x
    return float((x * np.uint64(0x2545F4914F6CDD1D)) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=True, inline="always")
def _exponential(rng: npt.NDArray[np.uint64], g: int, mean: float) -> float:
    return -mean * math.log(1.0 - _rand_unit(rng, g))


@njit(cache=True)
def _init_tasks(  # type: ignore[no-untyped-def]
    kind,
    thread_off,
    duty,
    on_mean_s,
    off_mean_s,
    round_cpu_s,
    rng,
    task_on,
    task_left_s,
    work_left_cpu_s,
):
    for g in range(kind.shape[0]):
        for t in range(thread_off[g], thread_off[g + 1]):
            if kind[g] == _BURSTY:
                if duty[g] >= 1.0:
                    # never sleeps: no toggle ever comes
                    task_on[t] = 1
                    task_left_s[t] = np.inf
                else:
                    # start in the stationary state; exponential times are memoryless,
                    # so the time left in it is a fresh draw
                    task_on[t] = 1 if _rand_unit(rng, g) < duty[g] else 0
                    mean = on_mean_s[g] if task_on[t] == 1 else off_mean_s[g]
                    task_left_s[t] = _exponential(rng, g, mean)
            elif kind[g] == _PARALLEL:
                work_left_cpu_s[t] = round_cpu_s[g]


@njit(cache=True)
def _entitlements(busy, shares, pcpus, ent):  # type: ignore[no-untyped-def]
    """Water-filling: ``pcpus`` split by shares among busy guests, capped at ``busy``."""
    n = busy.shape[0]
    capped = np.zeros(n, dtype=np.bool_)
    for g in range(n):
        ent[g] = 0.0
        capped[g] = busy[g] == 0
    remaining = float(pcpus)
    while True:
        total = 0.0
        for g in range(n):
            if not capped[g]:
                total += shares[g]
        if total == 0.0:
            return
        any_capped = False
        for g in range(n):
            if not capped[g] and remaining * shares[g] / total >= busy[g]:
                ent[g] = busy[g]
                capped[g] = True
                any_capped = True
                remaining -= busy[g]
        if not any_capped:
            for g in range(n):
                if not capped[g]:
                    ent[g] = remaining * shares[g] / total
            return


@njit(cache=True)
def _parallel_own_vcpus(  # type: ignore[no-untyped-def]  # noqa: PLR0912 (a numba kernel: one flat loop)
    quantum_s, round_cpu_s, work_left, running, start_s, done_cpu_s
):
    """One quantum of a parallel job whose threads each have their own vCPU.

    ``running[i]``: thread i's vCPU runs this quantum, from ``start_s[i]`` (after any
    cache refill) to the end. Adds each thread's own work to ``done_cpu_s``; the rest
    of a running vCPU's time is spin. Rounds can end mid-quantum.
    """
    n = work_left.shape[0]
    all_running = True
    for i in range(n):
        if not running[i]:
            all_running = False
    while True:
        # The round can end this quantum only if no descheduled thread still has work.
        blocked = False
        for i in range(n):
            if not running[i] and work_left[i] > 0.0:
                blocked = True
        end_s = 0.0
        if not blocked:
            for i in range(n):
                if running[i] and work_left[i] > 0.0:
                    end_s = max(end_s, start_s[i] + work_left[i])
        if blocked or end_s > quantum_s:
            for i in range(n):
                if running[i]:
                    d = min(work_left[i], max(0.0, quantum_s - start_s[i]))
                    work_left[i] -= d
                    done_cpu_s[i] += d
            return
        # The barrier opens at end_s: everyone finished, the next round starts.
        aligned = True
        for i in range(n):
            if running[i]:
                done_cpu_s[i] += work_left[i]
                start_s[i] = max(start_s[i], end_s)
                if start_s[i] != start_s[0]:
                    aligned = False
            work_left[i] = round_cpu_s
        if all_running and aligned:
            # Every thread runs from the same moment: whole rounds fit with no spin.
            rounds = math.floor((quantum_s - start_s[0]) / round_cpu_s)
            if rounds > 0:
                for i in range(n):
                    done_cpu_s[i] += rounds * round_cpu_s
                    start_s[i] += rounds * round_cpu_s


@njit(cache=True)
def _run_quanta(  # type: ignore[no-untyped-def]  # noqa: PLR0912, PLR0915 (a numba kernel: one flat loop)
    quanta,
    quantum_s,
    switch_cost_s,
    pcpus,
    kind,
    threads,
    vcpus,
    online,
    shares,
    on_mean_s,
    off_mean_s,
    round_cpu_s,
    vcpu_off,
    thread_off,
    rng,
    task_on,
    task_left_s,
    work_left_cpu_s,
    credit,
    rotor,
    vcpu_pcpu,
    pcpu_vcpu,
    out,
):
    n = kind.shape[0]
    nv = vcpu_pcpu.shape[0]
    busy = np.zeros(n, dtype=np.int64)  # busy vCPUs (the lowest-numbered ones)
    slots = np.zeros(n, dtype=np.int64)  # processors the guest gets this quantum
    ent = np.zeros(n, dtype=np.float64)
    runs = np.zeros(nv, dtype=np.bool_)
    loss_s = np.zeros(nv, dtype=np.float64)
    claimed = np.zeros(pcpus, dtype=np.bool_)
    max_threads = 1
    for g in range(n):
        max_threads = max(max_threads, threads[g])
    th_running = np.zeros(max_threads, dtype=np.bool_)
    th_start_s = np.zeros(max_threads, dtype=np.float64)
    th_done_cpu_s = np.zeros(max_threads, dtype=np.float64)

    for _ in range(quanta):
        # 1. Guest OS: runnable tasks, and the busy vCPUs they occupy.
        total_busy = 0
        for g in range(n):
            t0 = thread_off[g]
            t1 = thread_off[g + 1]
            runnable = 0
            if kind[g] == _CPU_BOUND or kind[g] == _PARALLEL:
                runnable = threads[g]
            elif kind[g] == _BURSTY:
                for t in range(t0, t1):
                    while task_left_s[t] <= 0.0:
                        task_on[t] = 1 - task_on[t]
                        mean = on_mean_s[g] if task_on[t] == 1 else off_mean_s[g]
                        task_left_s[t] += _exponential(rng, g, mean)
                    runnable += task_on[t]
            out[_OUT_DEMAND, g] += min(runnable, vcpus[g]) * quantum_s
            # a parallel job with its own vCPUs keeps them all busy: working or spinning
            busy[g] = min(runnable, online[g])
            total_busy += busy[g]

        # 2. Host: how many processors each guest gets.
        if total_busy <= pcpus:
            for g in range(n):
                slots[g] = busy[g]
                credit[g] = 0.0  # nobody is short, nobody is owed
        else:
            _entitlements(busy, shares, pcpus, ent)
            for g in range(n):
                slots[g] = 0
                credit[g] = credit[g] + ent[g] if busy[g] > 0 else 0.0
            for _s in range(pcpus):
                best = -1
                for g in range(n):
                    if slots[g] < busy[g] and (best < 0 or credit[g] > credit[best]):
                        best = g
                slots[best] += 1
                credit[best] -= 1.0
            for g in range(n):
                credit[g] = min(max(credit[g], -CREDIT_CAP_SLOTS), CREDIT_CAP_SLOTS)

        # Which of a guest's busy vCPUs run: all, or the next ones in rotation.
        for v in range(nv):
            runs[v] = False
        for g in range(n):
            k = busy[g]
            if k == 0:
                continue
            first = rotor[g] % k
            for j in range(slots[g]):
                runs[vcpu_off[g] + (first + j) % k] = True
            rotor[g] = (first + slots[g]) % k

        # Placement: stay where the cache is still yours, else the lowest free processor.
        for p in range(pcpus):
            claimed[p] = False
        for v in range(nv):
            if runs[v]:
                p = vcpu_pcpu[v]
                loss_s[v] = -1.0
                if p >= 0 and pcpu_vcpu[p] == v and not claimed[p]:
                    claimed[p] = True
                    loss_s[v] = 0.0
        for v in range(nv):
            if runs[v] and loss_s[v] < 0.0:
                pick = -1
                for p in range(pcpus):
                    if not claimed[p] and (pick < 0 or pcpu_vcpu[p] == -1):
                        pick = p
                        if pcpu_vcpu[p] == -1:
                            break
                claimed[pick] = True
                loss_s[v] = switch_cost_s if pcpu_vcpu[pick] >= 0 else 0.0
                pcpu_vcpu[pick] = v
                vcpu_pcpu[v] = pick

        # 3. Progress.
        for g in range(n):
            v0 = vcpu_off[g]
            ran = 0.0
            lost = 0.0
            for v in range(v0, v0 + busy[g]):
                if runs[v]:
                    ran += quantum_s
                    lost += loss_s[v]
            out[_OUT_RAN, g] += ran
            out[_OUT_SWITCH, g] += lost
            if kind[g] != _PARALLEL:
                out[_OUT_USEFUL, g] += ran - lost
                continue
            t0 = thread_off[g]
            nt = threads[g]
            if online[g] < nt:
                # The guest multiplexes: waiters block, all time goes to the round.
                round_cpu = nt * round_cpu_s[g]
                pool = 0.0
                for t in range(t0, t0 + nt):
                    pool += work_left_cpu_s[t]
                cpu = ran - lost
                if cpu < pool:
                    pool -= cpu
                else:
                    rest = cpu - pool
                    pool = round_cpu - (rest - math.floor(rest / round_cpu) * round_cpu)
                for t in range(t0, t0 + nt):
                    work_left_cpu_s[t] = pool / nt
                out[_OUT_USEFUL, g] += cpu
            else:
                for i in range(nt):
                    th_running[i] = runs[v0 + i]
                    th_start_s[i] = loss_s[v0 + i] if runs[v0 + i] else 0.0
                    th_done_cpu_s[i] = 0.0
                _parallel_own_vcpus(
                    quantum_s,
                    round_cpu_s[g],
                    work_left_cpu_s[t0 : t0 + nt],
                    th_running[:nt],
                    th_start_s[:nt],
                    th_done_cpu_s[:nt],
                )
                done = 0.0
                for i in range(nt):
                    done += th_done_cpu_s[i]
                out[_OUT_USEFUL, g] += done
                out[_OUT_SPIN, g] += ran - lost - done

        for t in range(task_left_s.shape[0]):
            task_left_s[t] -= quantum_s
