"""The experiments behind the claims in ``docs/experiments/``: run, check, write pages.

Each experiment runs shipped scenarios from ``scenarios/`` under one or more policies,
computes its figures from the runs, checks them against the goals we claim, and can
write a page (Markdown + PNG + JSON) for ``docs/experiments/``. The tests run the same
functions, so a claim in the docs is a claim the test suite checks.

    python -m balloonist.experiments [--scenarios DIR] OUTDIR [NAME ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import operator
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from matplotlib.figure import Figure

from balloonist.atomicfile import write_atomic
from balloonist.model import CpuSpec
from balloonist.report import write_png_atomic
from balloonist.sim.result import SimResult
from balloonist.sim.runner import run_scenario
from balloonist.sim.scenario import Scenario, load_scenario
from balloonist.units import MIB

_OPS: Final[dict[str, Callable[[float, float], bool]]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "==": operator.eq,
    "<=": operator.le,
}


@dataclass(frozen=True)
class Check:
    """One claim: ``value <op> goal``."""

    claim: str
    value: float
    op: str
    goal: float

    @property
    def passed(self) -> bool:
        return _OPS[self.op](self.value, self.goal)


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    scenario: str  # file name in the scenarios directory
    summary: str  # what the experiment shows, for the page
    figures: dict[str, float]
    checks: tuple[Check, ...]
    runs: dict[str, SimResult] = field(repr=False)
    table: tuple[tuple[str, ...], ...] = ()  # first row is the header
    wall_s: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def _throughput(result: SimResult, guest: str | None = None) -> float:
    guests = [result.guest(guest)] if guest else list(result.guests)
    return sum(float(g.refs.sum()) for g in guests) / result.duration_s


def _total(result: SimResult, series: str) -> int:
    return sum(int(getattr(g, series).sum()) for g in result.guests)


# -- the four experiments ----------------------------------------------------------------


def fidelity(scenarios: Path) -> Experiment:
    sc = load_scenario(scenarios / "fidelity.toml")
    run = run_scenario(sc)
    sizes = sorted({int(g.name.split("-")[1]) for g in run.guests})
    rows: list[tuple[str, ...]] = [
        ("size (MiB)", "ballooned refs/s", "native refs/s", "ballooned / native")
    ]
    figures: dict[str, float] = {}
    for size in sizes:
        ballooned = _throughput(run, f"ballooned-{size}")
        native = _throughput(run, f"native-{size}")
        ratio = ballooned / native
        figures[f"ratio_{size}mib"] = ratio
        rows.append((str(size), f"{ballooned:,.0f}", f"{native:,.0f}", f"{ratio:.3f}"))
    worst = min(figures.values())
    figures["worst_ratio"] = worst
    return Experiment(
        name="fidelity",
        title="Balloon fidelity",
        scenario="fidelity.toml",
        summary=(
            "A guest configured with 512 MiB and ballooned down to S runs the same zipf "
            "workload as a guest configured with S (the ESX paper's dbench test, Fig. 3). "
            "The balloon is inflated during an idle first phase, as the paper did before "
            "starting the benchmark. Ballooned and native guests run the same guest OS "
            "model, so the only difference is the balloon; the ESX paper measured 1.4 to "
            "4.4 % overhead, which it traced to guest kernel data structures sized for the "
            "larger memory, something this simulator does not model."
        ),
        figures=figures,
        checks=(Check("ballooned throughput / native throughput, worst size", worst, ">=", 0.95),),
        runs={"shares": run},
        table=tuple(rows),
    )


def idle_tax(scenarios: Path) -> Experiment:
    sc = load_scenario(scenarios / "idle-tax.toml")
    runs = {
        f"tax {tau}": run_scenario(dataclasses.replace(sc, tax_rate=tau)) for tau in (0.0, 0.75)
    }
    busy0 = _throughput(runs["tax 0.0"], "busy")
    busy75 = _throughput(runs["tax 0.75"], "busy")
    rows: list[tuple[str, ...]] = [
        ("tax rate", "busy refs/s", "busy mean MiB", "idle mean MiB", "busy major faults")
    ]
    for label, run in runs.items():
        busy, idle = run.guest("busy"), run.guest("idle")
        rows.append(
            (
                label.removeprefix("tax "),
                f"{_throughput(run, 'busy'):,.0f}",
                f"{busy.allocation_bytes.mean() / MIB:.0f}",
                f"{idle.allocation_bytes.mean() / MIB:.0f}",
                f"{int(busy.major_faults.sum()):,}",
            )
        )
    return Experiment(
        name="idle-tax",
        title="Idle memory tax",
        scenario="idle-tax.toml",
        summary=(
            "Two guests with equal shares; one fills 600 MiB and goes idle, the other works "
            "on 640 MiB (the ESX paper's Fig. 7). Without the tax, equal shares mean equal "
            "memory and the busy guest pages. With the default tax rate of 0.75 an idle page "
            "costs four active ones, so the idle guest's memory is reclaimed by its balloon "
            "and the busy guest's working set fits. The tax-0 run is the same file with "
            "`tax_rate = 0` under `[policy]`."
        ),
        figures={"busy_tax_0": busy0, "busy_tax_0.75": busy75, "ratio": busy75 / busy0},
        checks=(Check("busy throughput, tax 0.75 / tax 0", busy75 / busy0, ">=", 1.3),),
        runs=runs,
        table=tuple(rows),
    )


def double_paging(scenarios: Path) -> Experiment:
    sc = load_scenario(scenarios / "double-paging.toml")
    runs = {p: run_scenario(sc, policy_name=p) for p in ("shares", "host-swap")}
    shares, host = runs["shares"], runs["host-swap"]
    rows: list[tuple[str, ...]] = [
        ("policy", "refs/s", "guest major faults", "host swap-ins", "double paging")
    ]
    for name, run in runs.items():
        rows.append(
            (
                name,
                f"{_throughput(run):,.0f}",
                f"{_total(run, 'major_faults'):,}",
                f"{_total(run, 'host_swap_ins'):,}",
                f"{_total(run, 'double_paging'):,}",
            )
        )
    ratio = _throughput(shares) / _throughput(host)
    return Experiment(
        name="double-paging",
        title="Double paging: balloon against host swapping",
        scenario="double-paging.toml",
        summary=(
            "Three 512 MiB guests whose hot sets drift through 640 MiB share a 1 GiB host. "
            "With a balloon (`shares`) each guest OS pages with its own LRU and drops what "
            "its program left behind. Without one (`host-swap`, same allocation targets) "
            "the host pages at random behind the guests' backs: it keeps stale pages, "
            "evicts hot ones, and when a guest later swaps out a page the host had already "
            "swapped, the page is read back only to be written out again."
        ),
        figures={
            "shares_refs_per_s": _throughput(shares),
            "host_swap_refs_per_s": _throughput(host),
            "ratio": ratio,
            "shares_double_paging": _total(shares, "double_paging"),
            "host_swap_double_paging": _total(host, "double_paging"),
        },
        checks=(
            Check("aggregate throughput, shares / host-swap", ratio, ">=", 2.0),
            Check("double-paging events under host-swap", _total(host, "double_paging"), ">", 0),
            Check("double-paging events under shares", _total(shares, "double_paging"), "==", 0),
        ),
        runs=runs,
        table=tuple(rows),
    )


def _without_cpu_balloons(sc: Scenario) -> Scenario:
    """``sc`` with ``cpu_balloon = false`` for every guest: the host time-slices."""

    def off(cpu: CpuSpec | None) -> CpuSpec | None:
        return None if cpu is None else dataclasses.replace(cpu, balloon=False)

    guests = tuple(
        dataclasses.replace(g, spec=dataclasses.replace(g.spec, cpu=off(g.spec.cpu)))
        for g in sc.guests
    )
    return dataclasses.replace(sc, guests=guests)


def _useful(result: SimResult, guest: str | None = None) -> float:
    cpus = [result.cpu(guest)] if guest else list(result.cpus)
    return sum(float(c.useful_cpu_s.sum()) for c in cpus) / result.duration_s


def _wasted(result: SimResult) -> float:
    return (
        sum(float(c.spin_cpu_s.sum() + c.switch_lost_cpu_s.sum()) for c in result.cpus)
        / result.duration_s
    )


def cpu_balloon(scenarios: Path) -> Experiment:
    sc = load_scenario(scenarios / "cpu-balloon.toml")
    runs = {
        "CPU balloon": run_scenario(sc),
        "time-slicing": run_scenario(_without_cpu_balloons(sc)),
    }
    assert sc.host_cpus is not None
    host_cpus = sc.host_cpus
    rows: list[tuple[str, ...]] = [
        ("run", "useful CPU-s/s", "spinning", "cache refills", *(g.name for g in sc.guests))
    ]
    for label, run in runs.items():
        rows.append(
            (
                label,
                f"{_useful(run):.2f} of {host_cpus}",
                f"{sum(float(c.spin_cpu_s.sum()) for c in run.cpus) / run.duration_s:.2f}",
                f"{sum(float(c.switch_lost_cpu_s.sum()) for c in run.cpus) / run.duration_s:.2f}",
                *(
                    f"{_useful(run, c.name):.2f} on {c.online_vcpus.mean():.1f} vCPUs"
                    for c in run.cpus
                ),
            )
        )
    balloon, sliced = runs["CPU balloon"], runs["time-slicing"]
    ratio = _useful(balloon) / _useful(sliced)
    lost = _wasted(balloon) / host_cpus
    shares = _useful(balloon, "render") / _useful(balloon, "solver")
    return Experiment(
        name="cpu-balloon",
        title="The CPU balloon against host time-slicing",
        scenario="cpu-balloon.toml",
        summary=(
            "Three guests with 10 vCPUs between them on a 4-processor host (claims 11 and "
            "19 of the patent: the balloon scheme applied to processors). `render` (CPU "
            "shares 2000) and `solver` (1000) each run a 4-thread parallel job whose "
            "threads meet at a barrier every 5 ms of work; `web` serves bursts on 2 vCPUs. "
            "Time-slicing keeps all 10 vCPUs online and shares the processors among them by "
            "shares: a thread that reaches the barrier spins while the host has descheduled "
            "a sibling, and vCPUs that move between processors refill caches (1 ms each, "
            "sim/cpu.py). With the CPU balloon the shares policy grants whole processors by "
            "shares and demand (2, 1 and 1 here), each guest's balloon holds the rest of its "
            "vCPUs offline, and the guest multiplexes its threads on what it kept. `web` is "
            "served about as well either way; its granted processor idles between bursts, "
            "which is what a whole-processor grant costs. The time-slicing run is the same "
            "file with `cpu_balloon = false` for every guest."
        ),
        figures={
            "balloon_useful_cpu_s_per_s": _useful(balloon),
            "sliced_useful_cpu_s_per_s": _useful(sliced),
            "ratio": ratio,
            "balloon_lost_fraction": lost,
            "render_over_solver": shares,
        },
        checks=(
            Check("useful processor time, CPU balloon / time-slicing", ratio, ">=", 1.2),
            Check(
                "render / solver useful time under the CPU balloon (shares 2:1)", shares, ">=", 1.8
            ),
            Check(
                "share of the host's processor time lost to spinning and cache refills "
                "under the CPU balloon",
                lost,
                "<=",
                0.02,
            ),
        ),
        runs=runs,
        table=tuple(rows),
    )


#: When the guests of free-page-reporting.toml free their data set, and how much of it
#: counts as back at the host (of the 360 MiB they free).
FREED_AT_S: Final = 20.0
BACK_BYTES: Final = 300 * MIB


def _back_after_s(run: SimResult, guest: str) -> float | None:
    """Seconds after FREED_AT_S until the host held BACK_BYTES less for ``guest`` than
    just before; None if that never happened in the run."""
    g = run.guest(guest)
    before = int(g.allocation_bytes[run.time_s <= FREED_AT_S][-1])
    back = (run.time_s > FREED_AT_S) & (g.allocation_bytes <= before - BACK_BYTES)
    return float(run.time_s[back][0] - FREED_AT_S) if back.any() else None


def _held_mib_at(run: SimResult, guest: str, time_s: float) -> float:
    g = run.guest(guest)
    return float(g.allocation_bytes[run.time_s <= time_s][-1]) / MIB


def free_page_reporting(scenarios: Path) -> Experiment:
    sc = load_scenario(scenarios / "free-page-reporting.toml")
    run = run_scenario(sc)
    rows: list[tuple[str, ...]] = [
        ("guest", "MiB held before", "3 s after", "10 s after", "at the end", "300 MiB back after")
    ]
    figures: dict[str, float] = {}
    for name in ("report", "plain"):
        back = _back_after_s(run, name)
        held = [_held_mib_at(run, name, t) for t in (FREED_AT_S, FREED_AT_S + 3, FREED_AT_S + 10)]
        end = float(run.guest(name).allocation_bytes[-1]) / MIB
        figures |= {f"{name}_held_mib_3s_after": held[1], f"{name}_held_mib_at_end": end}
        figures[f"{name}_back_after_s"] = -1.0 if back is None else back
        rows.append(
            (
                name,
                *(f"{h:.0f}" for h in held),
                f"{end:.0f}",
                "not in the run" if back is None else f"{back:.0f} s",
            )
        )
    delay = max(g.free_page_reporting_delay_s or 0.0 for g in sc.guests)
    report_back = figures["report_back_after_s"]
    plain_3s = figures["plain_held_mib_3s_after"]
    return Experiment(
        name="free-page-reporting",
        title="Free page reporting",
        scenario="free-page-reporting.toml",
        summary=(
            "Two identical guests build a 400 MiB data set, then free all but 40 MiB at "
            f"{FREED_AT_S:.0f} s and idle; a third grows into the room from 30 s on, under "
            "the default policy. `report` has free page reporting "
            "(virtio-balloon's `free-page-reporting=on`, which `balloonist vm start` "
            "sets): the pages it frees go back to the host about 2 s later, with no "
            "balloon move. `plain` keeps them on its free list, backed by host memory, "
            "until its balloon takes them, as fast as the policy inflates it. The "
            "policy does not know about reporting yet: it inflates both balloons alike, "
            "and `report`'s balloon lands on pages the host already has."
        ),
        figures=figures,
        checks=(
            Check(
                "report: seconds until 300 MiB were back at the host",
                report_back if report_back >= 0 else math.inf,
                "<=",
                delay + sc.period_s,
            ),
            Check(
                "plain: MiB the host still held for it 3 s after the free",
                plain_3s,
                ">=",
                figures["report_held_mib_3s_after"] + BACK_BYTES / MIB,
            ),
        ),
        runs={"demand": run},
        table=tuple(rows),
    )


EXPERIMENTS: Final[dict[str, Callable[[Path], Experiment]]] = {
    "fidelity": fidelity,
    "idle-tax": idle_tax,
    "double-paging": double_paging,
    "cpu-balloon": cpu_balloon,
    "free-page-reporting": free_page_reporting,
}


def run_experiment(name: str, scenarios: Path) -> Experiment:
    start = time.perf_counter()
    result = EXPERIMENTS[name](scenarios)
    return dataclasses.replace(result, wall_s=time.perf_counter() - start)


# -- pages ---------------------------------------------------------------------------------


def figures_json(exp: Experiment) -> dict[str, Any]:
    return {
        "experiment": exp.name,
        "scenario": f"scenarios/{exp.scenario}",
        "figures": exp.figures,
        "checks": [dataclasses.asdict(c) | {"passed": c.passed} for c in exp.checks],
        "runs": {label: run.summary() for label, run in exp.runs.items()},
    }


def write_page(exp: Experiment, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    plot = out / f"{exp.name}.png"
    _plot(exp, plot)
    data = out / f"{exp.name}.json"
    write_atomic(data, json.dumps(figures_json(exp), indent=2) + "\n", mode=0o666)
    page = out / f"{exp.name}.md"
    write_atomic(page, _markdown(exp), mode=0o666)
    return [page, plot, data]


def _markdown(exp: Experiment) -> str:
    lines = [f"# {exp.title}", "", exp.summary, ""]
    lines += [f"Scenario: [`scenarios/{exp.scenario}`](../../scenarios/{exp.scenario}).", ""]
    if exp.table:
        header, *body = exp.table
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(row) + " |" for row in body]
        lines.append("")
    lines += ["| claim | measured | goal | |", "|---|---|---|---|"]
    for c in exp.checks:
        mark = "met" if c.passed else "NOT met"
        lines.append(f"| {c.claim} | {c.value:.3f} | {c.op} {c.goal:g} | {mark} |")
    lines += ["", f"![{exp.title}]({exp.name}.png)", ""]
    lines += [
        "Reproduce with `make experiments` (writes this page), or run one case:",
        "",
        "```sh",
        *(
            f".venv/bin/balloonist simulate scenarios/{exp.scenario} --policy {run.policy} --json"
            for run in _distinct_policies(exp)
        ),
        "```",
        "",
        "The numbers are deterministic for the scenario's seed; `tests/test_experiments.py`"
        " reruns the experiment, checks every claim above, and checks that this page's"
        f" figures (`{exp.name}.json`) are the ones the code produces.",
        "",
    ]
    return "\n".join(lines)


def _distinct_policies(exp: Experiment) -> list[SimResult]:
    seen: dict[str, SimResult] = {}
    for run in exp.runs.values():
        seen.setdefault(run.policy, run)
    return list(seen.values())


def _plot(exp: Experiment, path: Path) -> None:
    fig = Figure(figsize=(11, 6.5), layout="constrained")
    if exp.name == "fidelity":
        _plot_fidelity(fig, exp)
    elif exp.name == "cpu-balloon":
        _plot_cpus(fig, exp)
    else:
        _plot_allocations(fig, exp)
    write_png_atomic(fig, path)


def _plot_fidelity(fig: Figure, exp: Experiment) -> None:
    run = exp.runs["shares"]
    sizes = sorted({int(g.name.split("-")[1]) for g in run.guests})
    ax = fig.add_subplot()
    for kind, marker in (("native", "o"), ("ballooned", "x")):
        ax.plot(
            sizes,
            [_throughput(run, f"{kind}-{s}") / 1e3 for s in sizes],
            marker=marker,
            label=f"{kind} (configured {'S' if kind == 'native' else '512 MiB'})",
        )
    ax.set_xlabel("memory S (MiB)")
    ax.set_ylabel("throughput (thousand refs/s)")
    ax.set_title("Balloon fidelity: ballooned down to S vs configured with S")
    ax.grid(alpha=0.3)
    ax.legend()


def _plot_cpus(fig: Figure, exp: Experiment) -> None:
    """Per run: each guest's useful processor time per second, and its vCPUs online."""
    axes = fig.subplots(len(exp.runs), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (label, run) in zip(axes, exp.runs.items(), strict=True):
        for c in run.cpus:
            (line,) = ax.plot(run.time_s, c.useful_cpu_s / run.period_s, label=f"{c.name}")
            ax.plot(
                run.time_s,
                c.online_vcpus,
                color=line.get_color(),
                linestyle=":",
                label=f"{c.name}: vCPUs online",
            )
        ax.set_title(
            f"{label}: {_useful(run):.2f} useful CPU-s/s of {run.host_cpus}",
            loc="left",
            fontsize="medium",
        )
        ax.set_ylabel("CPU-s per s / vCPUs")
        ax.set_ylim(0, max(c.vcpus for c in run.cpus) + 0.5)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right", fontsize="small", ncols=3)
    axes[-1].set_xlabel("simulated time (s)")
    fig.suptitle(f"{exp.title}: useful processor time (solid) and vCPUs online (dotted)")


def _plot_allocations(fig: Figure, exp: Experiment) -> None:
    """One panel per run (at most four): each guest's machine memory over time."""
    labels = list(exp.runs)[:4]
    axes = fig.subplots(len(labels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, label in zip(axes, labels, strict=True):
        run = exp.runs[label]
        for g in run.guests:
            ax.plot(run.time_s, g.allocation_bytes / MIB, label=g.name)
        throughput = _throughput(run)
        ax.set_title(f"{label}: {throughput:,.0f} refs/s", loc="left", fontsize="medium")
        ax.set_ylabel("MiB held")
        top = max(float(g.allocation_bytes.max()) for g in run.guests) / MIB
        ax.set_ylim(0, top * 1.25)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right", fontsize="small", ncols=3)
    axes[-1].set_xlabel("simulated time (s)")
    fig.suptitle(f"{exp.title}: machine memory held by each guest")


# -- command line ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m balloonist.experiments")
    parser.add_argument("out", type=Path, help="directory for the pages (docs/experiments)")
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(EXPERIMENTS))
    parser.add_argument("--scenarios", type=Path, default=Path("scenarios"))
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in EXPERIMENTS]
    if unknown:
        parser.error(f"unknown experiment {unknown[0]!r} (choose from {', '.join(EXPERIMENTS)})")
    failed = []
    for name in args.names or list(EXPERIMENTS):
        print(f"{name}: running ...", flush=True)
        exp = run_experiment(name, args.scenarios)
        write_page(exp, args.out)
        for c in exp.checks:
            mark = "met" if c.passed else "NOT MET"
            print(f"  {c.claim}: {c.value:.3f} (goal {c.op} {c.goal:g}) {mark}")
        print(f"  {exp.wall_s:.1f} s, page {args.out / (name + '.md')}", flush=True)
        if not exp.passed:
            failed.append(name)
    if failed:
        print(f"claims not met: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
