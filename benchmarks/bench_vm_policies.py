"""The daemon's default policy against its peers on real guests whose workloads change
phase: each guest's throughput, measured inside the guest, and its major faults.

Three 512 MiB test guests (virtio-balloon, touchmem) share a 1100 MiB budget under the
daemon, once per policy and round, back to back: the default policy (the daemon's
config default, whatever it is when this runs), then ``mom``, ``proxmox`` and
``static``, and in the next round the other way round (``--rounds``, 2 by default).
One pass does not rank them: on 12-06 the steady guest, which no policy touches, made
27 % more in the fourth run than in the first, more than the gap between the
policies, and TCG guests' speed drifts with the host. Alternating the order gives
every policy the same mean place in it, so a drift that is steady across the whole
run cancels in the means; each round's ratio is kept too, and a ranking that only
the means show is not one. The guests are booted afresh for every run, with the same
schedules and budget:

- "grow": 100 MiB working set, stepping up to 400 MiB a third of the way in, and
  staying there;
- "burst": 380 MiB from the start, nothing from a quarter of the way in (touchmem
  gives it back to the guest kernel and sleeps);
- "steady": 200 MiB throughout.

Why these sizes: 3 x 512 MiB is 1536 MiB, 1.4x the budget. Before the phase change
the guests need about 830 MiB (working sets plus ~45 MiB of kernel each), so the
budget could hold them all with 64 MiB available each (the daemon's floor); after it,
the grower needs ~450 MiB, and the budget holds that only if the burst guest's idle
memory is taken back. A policy that is slow to take it, or to give it, leaves the
grower faulting its working set in against a full balloon: Linux then reclaims and
deflates the balloon a page batch at a time (deflate-on-oom), which is what costs
throughput. The guests have no swap, so major faults stay near zero; they are
reported as the daemon reads them (virtio-balloon statistics).

Nothing on this host enforces the budget but the policy: QEMU's memory is plain host
memory, and the daemon's floor (``daemon/pacing.py``, rule 2) never inflates a guest
past 64 MiB available, whatever the policy wished. A policy that keeps the
guests over the budget therefore costs them nothing here, so each run also records
the guests' total allocation (mean, peak) and the periods it spent over the budget:
read the throughput next to them. An allocation is not host memory in use, though:
pages a guest never touched are not resident, so each run also records what the host
holds for each QEMU, its memory cgroup's usage each period (``vm start`` puts every VM
in one of its own), and the periods the three together held more than the budget.

Throughput is touchmem's own count: pages written per second (one byte into each
4 KiB page of the working set, sweep after sweep), the mean of its once-a-second
``BALLOONIST-WORK`` reports from t = 1 s to the end of the run, by touchmem's clock.
Under TCG the guests compete for the host's processors, so throughput also moves with
the host's load: the load average is recorded before and after each policy.

``--cap [MIB]`` (root): the host enforces the budget as well. The QEMUs' parent memory
cgroup is capped at 1250 MiB unless MIB says otherwise (the budget and about 50 MiB of
QEMU's own memory a guest, which the budget does not count), with a 1 GiB swap file on,
so the host pages whatever the three QEMUs hold over the cap, as an overcommitted host
would. A policy that keeps the guests over the budget then costs them host paging,
which the guests cannot steer: each run also records what each QEMU had in the host's
swap (peak). The cap is lifted and the swap file removed when the bench ends; written
to ``vm_policies_capped.json``.

``--quick``: 40 s per policy and one round unless ``--rounds`` says otherwise, written
to ``vm_policies_quick.json`` (``vm_policies_capped_quick.json`` with ``--cap``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any, Final

from _common import write_result
from _vm import ACCEL, assets, lines, state_dir, stop_all, wait_line, work_reports
from balloonist.cgroup import MemoryCgroup, host_memory_hierarchy, make_parent_cgroup
from balloonist.daemon.config import DAEMON_POLICIES, DaemonConfig
from balloonist.daemon.host_reclaim import SysCgroups, VmCgroup
from balloonist.daemon.service import Daemon
from balloonist.errors import HostCommandError
from balloonist.qemu import launcher
from balloonist.swapfile import swap_file
from balloonist.units import MIB, parse_size_bytes

GUEST_MIB: Final = 512
#: 1536 MiB of guests over this budget: overcommitted 1.4x (see the docstring).
BUDGET: Final = "1100MiB"
#: The guests' floor for the policies: enough for the kernel and a quiet touchmem.
MIN_MIB: Final = 128
#: The default's peers, in the order they run after it.
PEERS: Final = ("mom", "proxmox", "static")
FULL_S: Final = 180.0
QUICK_S: Final = 40.0
#: Three guests booting at once under TCG on a busy 2-core host take 15-40 s.
BOOT_TIMEOUT_S: Final = 180.0
#: How long after the run's length the slowest guest's touchmem may take to report it.
TAIL_TIMEOUT_S: Final = 60.0
#: The daemon's period (its default).
PERIOD_S: Final = 1.0
#: ``--cap``'s default: the budget and about 50 MiB of QEMU's own memory a guest.
CAP_MIB: Final = 1250
#: The host's swap while capped: more than the three QEMUs can hold over any cap.
HOST_SWAP_MIB: Final = 1024

#: The guest kernel's console line when it kills a process for memory.
_OOM_RE: Final = re.compile(r"Out of memory|oom-kill")


@dataclass(frozen=True)
class Workload:
    """One guest's touchmem schedule: (working set MiB, from this fraction of the run)."""

    name: str
    phases: tuple[tuple[int, float], ...]

    def schedule(self, duration_s: float) -> str:
        return ",".join(f"{ws}@{round(at * duration_s)}" for ws, at in self.phases)


WORKLOADS: Final = (
    Workload("grow", ((100, 0.0), (400, 1 / 3))),
    Workload("burst", ((380, 0.0), (0, 1 / 4))),
    Workload("steady", ((200, 0.0),)),
)


@dataclass
class Trace:
    """What the daemon saw, once a period: each guest's allocation and major faults,
    and what the host held for its QEMU."""

    allocated_bytes: dict[str, list[int]] = field(default_factory=dict)
    major_faults: dict[str, list[int]] = field(default_factory=dict)
    totals_bytes: list[int] = field(default_factory=list)
    #: What the host held for each QEMU (its memory cgroup's usage); absent without one.
    resident_bytes: dict[str, list[int]] = field(default_factory=dict)
    resident_totals_bytes: list[int] = field(default_factory=list)
    #: What of each QEMU's memory was in the host's swap; absent without accounting.
    swapped_bytes: dict[str, list[int]] = field(default_factory=dict)
    #: Processors each guest's QEMU used while the daemon ran, on average (1.0: one).
    cpu_share: dict[str, float] = field(default_factory=dict)


def _last_t_s(record: launcher.VMRecord) -> int:
    reports = work_reports(record)
    return reports[-1][0] if reports else -1


def qemu_cpu_s(record: launcher.VMRecord) -> float:
    """Processor time QEMU has used (user + system, all threads), from /proc."""
    assert record.pid is not None  # we started it
    with open(f"/proc/{record.pid}/stat", encoding="ascii") as fh:
        # fields after the command name, which is in parentheses and may hold spaces
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_cgroups(records: dict[str, launcher.VMRecord]) -> dict[str, VmCgroup]:
    """Each QEMU's own memory cgroup, as the daemon finds it, or none at all if any
    guest has none (a total over some of them would read as the host's)."""
    host = SysCgroups()
    found = {name: host.cgroup(r) for name, r in records.items()}
    own = {name: cg for name, cg in found.items() if cg is not None}
    return own if len(own) == len(records) else {}


def boot_guests(state: launcher.StateDir, duration_s: float) -> dict[str, launcher.VMRecord]:
    """All three at once (QEMU detaches), then wait for each to be up."""
    guest = assets()
    records = {
        w.name: launcher.start_vm(
            state,
            guest.start_request(
                w.name,
                GUEST_MIB * MIB,
                work=w.schedule(duration_s),
                accel=ACCEL,
                min_bytes=MIN_MIB * MIB,
            ),
        )
        for w in WORKLOADS
    }
    for record in records.values():
        wait_line(record, "BALLOONIST-READY", BOOT_TIMEOUT_S)
    return records


def drive(daemon: Daemon, records: dict[str, launcher.VMRecord], duration_s: float) -> Trace:
    """Step the daemon once a period until every touchmem has run ``duration_s``."""
    trace = Trace()
    begun = time.monotonic()
    deadline = begun + duration_s + TAIL_TIMEOUT_S
    cpu_begun = {name: qemu_cpu_s(r) for name, r in records.items()}
    cgroups = memory_cgroups(records)
    while min(_last_t_s(r) for r in records.values()) < duration_s:
        if time.monotonic() > deadline:
            raise TimeoutError(f"a guest's touchmem did not reach t={duration_s:.0f} s")
        started = time.monotonic()
        cycle = daemon.step()
        if cycle is not None and len(cycle.snapshot.guests) == len(records):
            for view in cycle.snapshot.guests:
                name = view.spec.name
                trace.allocated_bytes.setdefault(name, []).append(view.sample.allocated_bytes)
                trace.major_faults.setdefault(name, []).append(view.sample.major_faults)
            trace.totals_bytes.append(sum(v.sample.allocated_bytes for v in cycle.snapshot.guests))
            if cgroups:
                resident = {name: cg.usage_bytes() for name, cg in cgroups.items()}
                for name, used in resident.items():
                    trace.resident_bytes.setdefault(name, []).append(used)
                trace.resident_totals_bytes.append(sum(resident.values()))
                for name, cg in cgroups.items():
                    if (swapped := cg.swapped_bytes()) is not None:
                        trace.swapped_bytes.setdefault(name, []).append(swapped)
        daemon.idle(max(0.0, PERIOD_S - (time.monotonic() - started)))
    wall_s = time.monotonic() - begun
    for name, r in records.items():
        trace.cpu_share[name] = (qemu_cpu_s(r) - cpu_begun[name]) / wall_s
    return trace


def guest_figures(
    record: launcher.VMRecord, workload: Workload, trace: Trace, duration_s: float
) -> dict[str, Any]:
    reports = [r for r in work_reports(record) if 1 <= r[0] <= duration_s]
    # Each phase from its own start to the next one's, by touchmem's clock.
    bounds = [at * duration_s for _, at in workload.phases] + [duration_s + 1]
    phases = {
        f"{ws}MiB@{start:.0f}s": _mean([p for t, _, p in reports if start <= t < end])
        for (ws, _), start, end in zip(workload.phases, bounds, bounds[1:], strict=False)
    }
    faults = trace.major_faults.get(record.name, [0])
    throughput = _mean([p for _, _, p in reports])
    share = trace.cpu_share[record.name]
    return {
        "throughput_pages_per_s": throughput,
        # the same per processor-second QEMU got: less sensitive to the host's load
        "qemu_cpu_share": round(share, 3),
        "throughput_pages_per_qemu_cpu_s": round(throughput / share) if share > 0 else 0,
        "throughput_by_phase_pages_per_s": phases,
        "reports": len(reports),
        "major_faults": faults[-1] - faults[0],
        "mean_allocation_mib": round(fmean(trace.allocated_bytes.get(record.name, [0])) / MIB, 1),
        **_resident(trace.resident_bytes.get(record.name, [])),
        "peak_swapped_mib": _peak_mib(trace.swapped_bytes.get(record.name, [])),
        **_moves(trace.allocated_bytes.get(record.name, [])),
        "oom_kill_lines": sum(1 for line in lines(record) if _OOM_RE.search(line)),
    }


def _resident(resident_bytes: list[int]) -> dict[str, float | None]:
    """What the host held for the guest's QEMU, mean and peak; None without a cgroup."""
    if not resident_bytes:
        return {"mean_resident_mib": None, "peak_resident_mib": None}
    return {
        "mean_resident_mib": round(fmean(resident_bytes) / MIB, 1),
        "peak_resident_mib": round(max(resident_bytes) / MIB, 1),
    }


def _peak_mib(values_bytes: list[int]) -> float | None:
    return round(max(values_bytes) / MIB, 1) if values_bytes else None


def _moves(allocated_bytes: list[int]) -> dict[str, float]:
    """How far the guest's size moved between periods: a large move costs a TCG guest
    work even over memory it does not use (``bench_vm_balloon_moves.py``)."""
    steps = [abs(b - a) for a, b in itertools.pairwise(allocated_bytes)]
    return {
        "moved_mib": round(sum(steps) / MIB, 1),
        "largest_move_mib": round(max(steps, default=0) / MIB, 1),
        "periods_moved_over_8_mib": sum(1 for m in steps if m > 8 * MIB),
    }


def run_policy(policy: str, duration_s: float) -> dict[str, Any]:
    """Fresh guests, the daemon under ``policy`` for ``duration_s``, then stop them."""
    load_before = os.getloadavg()[0]
    state = state_dir()
    try:
        records = boot_guests(state, duration_s)
        config = DaemonConfig.model_validate(
            {"daemon": {"budget": BUDGET, "period_s": PERIOD_S}, "policy": {"name": policy}}
        )
        daemon = Daemon(config, state)
        lead_s = {name: max(0, _last_t_s(r)) for name, r in records.items()}
        try:
            trace = drive(daemon, records, duration_s)
        finally:
            daemon.close()
        guests = {w.name: guest_figures(records[w.name], w, trace, duration_s) for w in WORKLOADS}
    finally:
        stop_all(state)
    budget_bytes = parse_size_bytes(BUDGET)
    return {
        "guests": guests,
        "total_throughput_pages_per_s": round(
            sum(g["throughput_pages_per_s"] for g in guests.values())
        ),
        "total_pages_per_qemu_cpu_s": round(
            sum(g["throughput_pages_per_s"] for g in guests.values())
            / sum(g["qemu_cpu_share"] for g in guests.values())
        ),
        "total_allocation_mib_mean": round(fmean(trace.totals_bytes) / MIB, 1),
        "total_allocation_mib_peak": round(max(trace.totals_bytes) / MIB, 1),
        "periods_over_budget": sum(1 for b in trace.totals_bytes if b > budget_bytes),
        **_total_resident(trace.resident_totals_bytes, budget_bytes),
        "total_swapped_mib_peak": _peak_mib(
            [sum(per_period) for per_period in zip(*trace.swapped_bytes.values(), strict=False)]
            if len(trace.swapped_bytes) == len(WORKLOADS)
            else []
        ),
        "periods": len(trace.totals_bytes),
        "workload_s_before_daemon": lead_s,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def _total_resident(totals_bytes: list[int], budget_bytes: int) -> dict[str, float | int | None]:
    """What the host held for the three QEMUs together, and the periods it was over the
    budget; None where the guests have no cgroups of their own."""
    if not totals_bytes:
        return {
            "total_resident_mib_mean": None,
            "total_resident_mib_peak": None,
            "periods_resident_over_budget": None,
        }
    return {
        "total_resident_mib_mean": round(fmean(totals_bytes) / MIB, 1),
        "total_resident_mib_peak": round(max(totals_bytes) / MIB, 1),
        "periods_resident_over_budget": sum(1 for b in totals_bytes if b > budget_bytes),
    }


@contextlib.contextmanager
def enforced_budget(cap_bytes: int) -> Iterator[MemoryCgroup]:
    """The QEMUs' parent memory cgroup capped at ``cap_bytes``, with a swap file on so
    the host pages what they hold over it. Afterwards the cap is lifted, then the swap
    goes (every guest has stopped by then: swapoff would read their pages back)."""
    hierarchy = host_memory_hierarchy()
    if hierarchy is None:
        raise SystemExit("--cap: this host has no memory cgroup hierarchy to cap")
    parent = make_parent_cgroup(hierarchy)
    if (held := parent.limit_bytes()) is not None:
        raise SystemExit(f"--cap: {parent.name} is already capped at {held} bytes; lift it first")
    swap_dir = Path(tempfile.mkdtemp(prefix="bn-bench-swap-", dir="/var/tmp"))
    try:
        with swap_file(swap_dir, HOST_SWAP_MIB * MIB):
            parent.set_limit(cap_bytes)
            try:
                yield parent
            finally:
                parent.set_limit(None)
    except HostCommandError as exc:
        raise SystemExit(f"--cap: {exc}") from None
    finally:
        with contextlib.suppress(OSError):  # a failed swapoff leaves its file, still on
            swap_dir.rmdir()


def run_order(policies: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, policy) in the order they run: each round the other way round, so every
    policy's mean place in the run is the same after an even number of rounds."""
    return [(r, p) for r in range(rounds) for p in (policies if r % 2 == 0 else policies[::-1])]


def over_best_peer(
    results: dict[str, dict[str, Any]], order: list[str], figure: str
) -> tuple[str, float]:
    """The best peer by ``figure`` (order[0] is the default), and default / best peer."""
    best = max(order[1:], key=lambda p: float(results[p][figure]))
    return best, float(results[order[0]][figure]) / float(results[best][figure])


def mean_of_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A policy's figures over its rounds: the mean of each total, and each run's."""
    return {
        "total_throughput_pages_per_s": round(
            fmean(r["total_throughput_pages_per_s"] for r in runs)
        ),
        "total_pages_per_qemu_cpu_s": round(fmean(r["total_pages_per_qemu_cpu_s"] for r in runs)),
        "steady_pages_per_s": [r["guests"]["steady"]["throughput_pages_per_s"] for r in runs],
        "periods_over_budget": [r["periods_over_budget"] for r in runs],
        "total_resident_mib_mean": [r["total_resident_mib_mean"] for r in runs],
        "total_swapped_mib_peak": [r["total_swapped_mib_peak"] for r in runs],
        "runs": runs,
    }


def _mean(values: list[int]) -> float:
    return round(fmean(values)) if values else 0.0


def _table(results: dict[str, dict[str, Any]]) -> str:
    rows = [
        f"{'policy':>8} {'round':>5} " + " ".join(f"{w.name + ' pages/s':>16}" for w in WORKLOADS)
    ]
    rows[0] += f" {'total pages/s':>14} {'per cpu-s':>10} {'majflt':>7} {'alloc MiB (mean)':>18}"
    rows[0] += f" {'moved MiB':>16} {'resident MiB (mean)':>20} {'swapped MiB (peak)':>19}"
    for policy, summary in results.items():
        for k, r in enumerate(summary["runs"]):
            g = r["guests"]
            row = f"{policy:>8} {k:>5} " + " ".join(
                f"{g[w.name]['throughput_pages_per_s']:>16,.0f}" for w in WORKLOADS
            )
            faults = sum(g[w.name]["major_faults"] for w in WORKLOADS)
            alloc = "/".join(f"{g[w.name]['mean_allocation_mib']:.0f}" for w in WORKLOADS)
            moved = "/".join(f"{g[w.name]['moved_mib']:.0f}" for w in WORKLOADS)
            held = r["total_resident_mib_mean"]
            resident = "-" if held is None else f"{held:.0f}"
            peak = r["total_swapped_mib_peak"]
            swapped = "-" if peak is None else f"{peak:.0f}"
            rows.append(
                f"{row} {r['total_throughput_pages_per_s']:>14,} "
                f"{r['total_pages_per_qemu_cpu_s']:>10,} {faults:>7} {alloc:>18} {moved:>16}"
                f" {resident:>20} {swapped:>19}"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_S:.0f} s per policy")
    parser.add_argument("--rounds", type=int, help="rounds of every policy (2; 1 with --quick)")
    parser.add_argument(
        "--cap",
        type=int,
        nargs="?",
        const=CAP_MIB,
        metavar="MIB",
        help=f"the host caps the QEMUs together at MIB ({CAP_MIB}) and swaps the rest (root)",
    )
    args = parser.parse_args()
    rounds = args.rounds if args.rounds is not None else 1 if args.quick else 2
    if rounds < 1:
        parser.error(f"--rounds must be at least 1, got {rounds}")
    if args.cap is not None:
        if args.cap <= 0:
            parser.error(f"--cap must be a positive number of MiB, got {args.cap}")
        if os.geteuid() != 0:
            parser.error("--cap needs root: it caps a memory cgroup and turns on a swap file")
        budget_mib = parse_size_bytes(BUDGET) // MIB
        if args.cap < budget_mib:
            parser.error(f"--cap {args.cap} MiB is below the budget itself ({budget_mib} MiB)")
    with (
        contextlib.nullcontext() if args.cap is None else enforced_budget(args.cap * MIB)
    ) as capped:
        if capped is not None:
            print(
                f"host: {HOST_SWAP_MIB} MiB of swap on, {capped.name} capped at {args.cap} MiB",
                flush=True,
            )
        bench(args.quick, rounds, args.cap)


def bench(quick: bool, rounds: int, cap_mib: int | None) -> None:
    duration_s = QUICK_S if quick else FULL_S
    default = DaemonConfig().policy.name
    order = [default, *(p for p in PEERS if p != default)]
    assert all(p in DAEMON_POLICIES for p in order), order
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in order}
    plan = run_order(order, rounds)
    for k, (r, policy) in enumerate(plan, 1):
        print(
            f"[{k}/{len(plan)}] round {r}, {policy}: booting 3 guests, "
            f"{duration_s:.0f} s of workload ...",
            flush=True,
        )
        runs[policy].append(run_policy(policy, duration_s))
        print(f"{policy}: {runs[policy][-1]}", flush=True)
    results = {p: mean_of_runs(runs[p]) for p in order}
    best_peer, ratio = over_best_peer(results, order, "total_throughput_pages_per_s")
    best_peer_cpu, ratio_cpu = over_best_peer(results, order, "total_pages_per_qemu_cpu_s")
    per_round = [
        over_best_peer({p: runs[p][r] for p in order}, order, "total_throughput_pages_per_s")
        for r in range(rounds)
    ]
    print(_table(results))
    print(f"default ({default}) / best peer ({best_peer}): {ratio:.3f} in pages/s, mean of rounds")
    print(f"default ({default}) / best peer ({best_peer_cpu}): {ratio_cpu:.3f} per QEMU cpu-s")
    for r, (peer, x) in enumerate(per_round):
        print(f"  round {r}: default / best peer ({peer}) {x:.3f}")
    accel = launcher.resolve_accel(ACCEL, launcher.qemu_binary())
    name = "vm_policies" + ("_capped" if cap_mib is not None else "") + ("_quick" if quick else "")
    path = write_result(
        name,
        {
            "accel": accel,
            "host_cap_mib": cap_mib,
            "host_swap_mib": HOST_SWAP_MIB if cap_mib is not None else None,
            "duration_s": duration_s,
            "guest_mib": GUEST_MIB,
            "min_mib": MIN_MIB,
            "budget": BUDGET,
            "schedules": {w.name: w.schedule(duration_s) for w in WORKLOADS},
            "throughput_unit": "pages written per second by touchmem (4 KiB pages)",
            "major_faults_source": "virtio-balloon statistics (stat-major-faults), run's delta",
            "default_policy": default,
            "order": order,
            "rounds": rounds,
            "run_order": [f"{r}:{p}" for r, p in plan],
            "policies": results,
            "best_peer": best_peer,
            "default_over_best_peer": round(ratio, 4),
            "best_peer_per_qemu_cpu_s": best_peer_cpu,
            "default_over_best_peer_per_qemu_cpu_s": round(ratio_cpu, 4),
            "default_over_best_peer_by_round": [
                {"best_peer": peer, "ratio": round(x, 4)} for peer, x in per_round
            ],
        },
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
