"""``balloonist suite``: check the options, generate, run, print the table, write the report.

Every option is checked before any work starts, so bad input costs nothing and leaves
nothing behind; the report is written only once every run is done.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final, TextIO

from rich.console import Console

from balloonist.errors import ConfigError
from balloonist.sim.names import POLICY_NAMES
from balloonist.suite.generator import GeneratorParams, generate_one

__all__ = [
    "DEFAULT_PARAMS",
    "RAY_MISSING",
    "SuiteOptions",
    "check_options",
    "parse_policies",
    "run_suite_command",
]

MAX_COUNT: Final = 1_000_000
#: The generator's ranges for the command (tests put smaller hosts here).
DEFAULT_PARAMS = GeneratorParams()
RAY_MISSING: Final = "--ray needs the ray package: pip install 'balloonist[ray]'"


@dataclass(frozen=True)
class SuiteOptions:
    count: int
    seed: int
    policies: tuple[str, ...]
    jobs: int
    report: Path | None
    ray: bool
    ray_address: str | None  # None: a local Ray instance


def parse_policies(text: str | None) -> tuple[str, ...]:
    if text is None:
        return POLICY_NAMES
    names = tuple(n.strip() for n in text.split(","))
    for name in names:
        if name not in POLICY_NAMES:
            raise ConfigError(
                f"unknown policy {name!r} (choose from {', '.join(POLICY_NAMES)})",
                where="--policies",
            )
    if len(set(names)) != len(names):
        raise ConfigError("a policy is named twice", where="--policies")
    return names


def check_options(
    *,
    count: int,
    seed: int,
    policies: str | None,
    jobs: int | None,
    report: Path | None,
    ray: str | None,
) -> SuiteOptions:
    if not 1 <= count <= MAX_COUNT:
        raise ConfigError(f"must be between 1 and {MAX_COUNT}, got {count}", where="--count")
    if not 0 <= seed < 2**63:
        raise ConfigError(f"must be between 0 and 2**63 - 1, got {seed}", where="--seed")
    names = parse_policies(policies)
    jobs_n = jobs if jobs is not None else (os.cpu_count() or 1)
    if jobs_n < 1:
        raise ConfigError(f"must be at least 1, got {jobs_n}", where="--jobs")
    if report is not None:
        from balloonist.report import check_report_dir  # matplotlib: only when needed

        check_report_dir(report)
    if ray is not None:
        from balloonist.suite.executors import ray_available

        if not ray_available():
            raise ConfigError(RAY_MISSING)
    return SuiteOptions(
        count=count,
        seed=seed,
        policies=names,
        jobs=jobs_n,
        report=report,
        ray=ray is not None,
        ray_address=ray or None,
    )


def run_suite_command(
    options: SuiteOptions, stdout: TextIO, params: GeneratorParams | None = None
) -> None:
    """Generate, run, print the table; write the report last (nothing if interrupted)."""
    from balloonist.suite.executors import (
        Executor,
        ProcessPoolAdapter,
        RayAdapter,
        SerialExecutor,
    )
    from balloonist.suite.progress import progress_view
    from balloonist.suite.runner import run_suite
    from balloonist.suite.stats import suite_stats
    from balloonist.suite.table import suite_table

    params = params or DEFAULT_PARAMS
    scenarios = [generate_one(options.seed, i, params) for i in range(options.count)]
    executor: Executor
    if options.ray:
        executor = RayAdapter(options.ray_address, options.jobs)
    elif options.jobs == 1:
        executor = SerialExecutor()  # no worker to start for one job
    else:
        executor = ProcessPoolAdapter(options.jobs)
    total = options.count * len(options.policies)
    start_s = time.monotonic()
    with progress_view(stdout, total) as on_done:
        records = run_suite(scenarios, options.policies, executor, on_done)
    wall_s = time.monotonic() - start_s
    cpu_s = sum(r.cpu_s for r in records)
    stats = suite_stats(records)
    title = (
        f"balloonist suite: {options.count} scenarios, seed {options.seed}, "
        f"{len(records)} runs, {cpu_s:.0f} CPU s in the runs, {wall_s:.0f} s wall"
    )
    Console(file=stdout, width=max(160, Console(file=stdout).width)).print(
        suite_table(stats, title=title)
    )
    if options.report is not None:
        from balloonist.suite.report import write_suite_report

        meta = {
            "title": title,
            "seed": options.seed,
            "count": options.count,
            "policies": list(options.policies),
            "generator": asdict(params),
            # so that benchmarks/bench_suite.py --add-records takes it as a slice
            "wall_s": wall_s,
            "cpu_s": cpu_s,
        }
        write_suite_report(options.report, [g.data for g in scenarios], records, stats, meta)
        print(f"report written to {options.report}", file=stdout, flush=True)
