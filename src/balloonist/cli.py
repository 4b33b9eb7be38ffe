"""The ``balloonist`` command line.

Exit codes: 0 done; 1 a :class:`BalloonistError` other than bad input, or a report
that could not be written; 2 bad input (:class:`ConfigError`, argparse usage error).
An error is one line on stderr, ``balloonist: error: <message>``, never a traceback.

Every input is checked (scenario file, policy name, report directory) before the
simulation starts, so bad input costs nothing and leaves nothing behind. Files are
written whole or not at all: ``agent-pyz`` builds next to its output and renames.

The simulator is reached through one seam, the :class:`Runner` passed to :func:`main`;
by default it is ``balloonist.sim.runner.run_scenario``, imported when first needed.
The demo's comparison hands it to worker processes, so it must pickle.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Final, TextIO

from rich.console import Console

from balloonist.errors import BalloonistError, ConfigError
from balloonist.sim.names import POLICY_NAMES

if TYPE_CHECKING:
    # The simulator is imported where a command needs it: numba compiles on import,
    # and `balloonist status` or `vm list` should not wait for it (nor numpy).
    from balloonist.sim.compare import PolicyProgress, Runner
    from balloonist.sim.result import Progress, SimResult
    from balloonist.sim.scenario import Scenario

__all__ = ["main"]

PROG: Final = "balloonist"
EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130  # 128 + SIGINT, what shells report for Ctrl-C

DEMO_OUT_DEFAULT: Final = Path("balloonist-demo")
DEMO_PLOT_NAME: Final = "demo.png"
#: Wall-clock seconds per simulated period in the demo's live view: fast enough for a
#: 90-period run to take about ten seconds, slow enough to watch the balloons move.
DEMO_PACE_S: Final = 0.1
MAX_PACE_S: Final = 10.0
AGENT_PYZ_DEFAULT: Final = Path("balloonist-agent.pyz")
DEMO_COMPARE_NAME: Final = "compare.json"
#: Policies the demo compares its run with: what the tools people know do (oVirt's
#: MoM, Proxmox's auto-ballooning) and a fixed share per guest; the scenario's own
#: policy joins them when --policy chose another.
DEMO_PEERS: Final = ("mom", "proxmox", "static")

ProgressCallback = Callable[["Progress"], None]


def _default_runner() -> Runner:
    # Imported late: the engine is heavy (numba compiles on import) and not needed to
    # validate input or print --version.
    from balloonist.sim.runner import run_scenario

    return run_scenario


@dataclass(frozen=True)
class _Io:
    stdout: TextIO
    stderr: TextIO
    runner: Callable[[], Runner]


def main(argv: Sequence[str] | None = None, *, runner: Runner | None = None) -> int:
    """Run the command line; returns the exit code (``__main__`` passes it to ``sys.exit``)."""
    io = _Io(
        stdout=sys.stdout,
        stderr=sys.stderr,
        runner=(lambda: runner) if runner is not None else _default_runner,
    )
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on usage errors, --help and --version
        return _exit_code(exc)
    command: Callable[[argparse.Namespace, _Io], int] = args.command
    try:
        return command(args, io)
    except ConfigError as exc:
        _error(io, str(exc))
        return EXIT_USAGE
    except BalloonistError as exc:
        _error(io, str(exc))
        return EXIT_FAILURE
    except OSError as exc:  # writing output: a full disk, a closed pipe, permissions
        _error(io, f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        _error(io, "interrupted")
        return EXIT_INTERRUPTED


def _error(io: _Io, message: str) -> None:
    one_line = " ".join(message.split("\n"))
    print(f"{PROG}: error: {one_line}", file=io.stderr, flush=True)


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return EXIT_OK
    if isinstance(exc.code, int):
        return exc.code
    return EXIT_USAGE


# ---------------------------------------------------------------------------------------
# Arguments


def _version() -> str:
    try:
        return metadata.version("balloonist")
    except metadata.PackageNotFoundError:  # running from a source tree, not installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Share one host's memory among virtual machines by ballooning.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    _add_demo_parser(sub)

    sim = sub.add_parser(
        "simulate",
        help="run a scenario file",
        description="Run a scenario file; print a summary, or JSON, and optionally "
        "write a report directory.",
    )
    sim.add_argument("scenario", type=Path, metavar="SCENARIO.toml")
    sim.add_argument("--policy", metavar="NAME", help=_policy_help())
    sim.add_argument(
        "--json",
        action="store_true",
        help="print only the summary as one JSON object on stdout",
    )
    sim.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="write summary.json, CSV time series and PNG plots into DIR "
        "(must not exist, or be empty)",
    )
    sim.add_argument("--no-live", action="store_true", help="plain progress lines")
    sim.set_defaults(command=_cmd_simulate)

    _add_suite_parser(sub)

    pyz = sub.add_parser(
        "agent-pyz",
        help="build balloonist-agent.pyz, the in-guest balloon agent as one file",
        description="Build the user-level balloon agent as one zipapp to copy into a "
        "Linux guest and run there as root with python3 >= 3.9 (see docs/agent.md).",
    )
    pyz.add_argument(
        "--output",
        type=Path,
        default=AGENT_PYZ_DEFAULT,
        metavar="PATH",
        help=f"where to write it; an existing file is replaced (default: ./{AGENT_PYZ_DEFAULT})",
    )
    pyz.set_defaults(command=_cmd_agent_pyz)

    _add_doctor_parser(sub)

    from balloonist import apicli, vmcli

    vmcli.add_commands(sub, _plain_command)
    apicli.add_commands(sub, _plain_command)
    return parser


def _add_demo_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help="run the built-in demo scenario and watch it live",
        description="Run the built-in demo scenario (an overcommitted host with three "
        "guests), show it live, then print a summary and write a plot; then run it under "
        "other policies in parallel and compare them side by side.",
    )
    demo.add_argument("--no-live", action="store_true", help="plain progress lines")
    demo.add_argument(
        "--no-compare",
        action="store_true",
        help=f"skip the comparison with other policies ({', '.join(DEMO_PEERS)}) "
        "after the live run",
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=DEMO_OUT_DEFAULT,
        metavar="DIR",
        help=f"where to write the plot and the comparison (default: ./{DEMO_OUT_DEFAULT})",
    )
    demo.add_argument("--policy", metavar="NAME", help=_policy_help())
    demo.add_argument(
        "--pace",
        type=float,
        default=DEMO_PACE_S,
        metavar="SECONDS",
        help="least wall-clock time per simulated period in the live view "
        f"(default: {DEMO_PACE_S}; 0 runs flat out)",
    )
    demo.set_defaults(command=_cmd_demo)


def _add_suite_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    suite = sub.add_parser(
        "suite",
        help="run every policy on many generated overcommitted hosts",
        description="Generate overcommitted hosts from a seed, run each policy on every "
        "one in parallel, and print how each policy does relative to the bound "
        "(docs/suite.md).",
    )
    suite.add_argument(
        "--count", type=int, default=200, metavar="N", help="scenarios (default: 200)"
    )
    suite.add_argument(
        "--seed", type=int, default=1, metavar="S", help="generator seed (default: 1)"
    )
    suite.add_argument(
        "--policies",
        metavar="P,...",
        help=f"comma-separated policies (default: all of {','.join(POLICY_NAMES)})",
    )
    suite.add_argument(
        "--jobs", type=int, metavar="J", help="runs at once (default: the machine's CPUs)"
    )
    suite.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="write records.json, summary.json, scenarios/*.toml and suite.png into DIR "
        "(must not exist, or be empty)",
    )
    suite.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run on a Ray cluster at ADDRESS, or on a local Ray instance without one",
    )
    suite.set_defaults(command=_cmd_suite)


def _add_doctor_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    doctor = sub.add_parser(
        "doctor",
        help="check what this host offers balloonist, one line each",
        description="Check KVM, QEMU and its balloon features, libvirt, the memory "
        "cgroup, KSM, PSI and /dev/shm; exit 1 if any check finds a problem. Starts no "
        "guest and changes nothing.",
    )
    doctor.add_argument(
        "--libvirt-uri",
        default=None,
        metavar="URI",
        help="the libvirt connection to try, read-only (default: qemu:///system)",
    )
    doctor.set_defaults(command=_plain_command(_cmd_doctor))


def _cmd_doctor(args: argparse.Namespace, out: TextIO) -> int:
    from balloonist import doctor
    from balloonist.libvirt.connection import DEFAULT_URI

    uri = args.libvirt_uri or DEFAULT_URI
    return doctor.render(doctor.diagnose(doctor.SystemProbe(), libvirt_uri=uri), out)


def _plain_command(
    handler: Callable[[argparse.Namespace, TextIO], int],
) -> Callable[[argparse.Namespace, _Io], int]:
    """Adapt a command that only needs stdout to the dispatcher's signature."""
    return lambda args, io: handler(args, io.stdout)


def _policy_help() -> str:
    return f"override the scenario's policy ({', '.join(POLICY_NAMES)})"


def _check_policy(name: str | None) -> None:
    if name is not None and name not in POLICY_NAMES:
        raise ConfigError(
            f"unknown policy {name!r} (choose from {', '.join(POLICY_NAMES)})", where="--policy"
        )


# ---------------------------------------------------------------------------------------
# Commands


def _cmd_demo(args: argparse.Namespace, io: _Io) -> int:
    from balloonist import report  # matplotlib is slow to import; only pay when needed
    from balloonist.live import summary_table
    from balloonist.sim.scenario import load_scenario_or_demo

    _check_policy(args.policy)
    pace_s: float = args.pace
    if not 0.0 <= pace_s <= MAX_PACE_S:
        raise ConfigError(f"must be between 0 and {MAX_PACE_S:g} seconds", where="--pace")
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise ConfigError("exists and is not a directory", where=f"--out {out}")
    scenario = load_scenario_or_demo(None)
    policy = args.policy or scenario.policy_name

    console = Console(file=io.stdout)
    live = io.stdout.isatty() and not args.no_live
    title = f"balloonist demo: {scenario.name} (policy {policy})"
    with _progress_view(console, io.stdout, live=live, title=title, pace_s=pace_s) as progress:
        result = io.runner()(scenario, policy_name=args.policy, progress=progress)

    console.print(summary_table(result.summary()))
    plot = out / DEMO_PLOT_NAME
    report.plot_overview(result, plot)
    # Plain print: a path must not be wrapped or read as rich markup.
    print(f"plot written to {plot}", file=io.stdout, flush=True)
    if not args.no_compare:
        _demo_compare(scenario, result, io, console, out=out, live=live)
    return EXIT_OK


def _demo_compare(
    scenario: Scenario, result: SimResult, io: _Io, console: Console, *, out: Path, live: bool
) -> None:
    """Run the demo's peers in parallel; print them beside ``result``; write compare.json."""
    from balloonist.atomicfile import write_atomic
    from balloonist.compareview import CompareBars, CompareLines, compare_table, verdict
    from balloonist.sim.compare import run_policies

    default = scenario.policy_name
    peers = [name for name in (default, *DEMO_PEERS) if name != result.policy]
    peers = list(dict.fromkeys(peers))  # the default may be a peer too
    jobs = min(len(peers), os.cpu_count() or 1)
    print(
        f"comparing with {', '.join(peers)} ({jobs} processes at once)",
        file=io.stdout,
        flush=True,
    )
    view: AbstractContextManager[Callable[[PolicyProgress], None]]
    if live:
        view = CompareBars(console, peers, periods=scenario.periods)
    else:
        view = nullcontext(CompareLines(io.stdout, peers, periods=scenario.periods))
    with view as progress:
        results = run_policies(scenario, peers, jobs=jobs, progress=progress, runner=io.runner())

    summaries = {result.policy: result.summary()}
    summaries.update((name, r.summary()) for name, r in results.items())
    note = "default" if result.policy == default else "--policy"
    console.print(compare_table(summaries, baseline=result.policy, baseline_note=note))
    print(verdict(summaries, baseline=result.policy, baseline_note=note), file=io.stdout)
    path = out / DEMO_COMPARE_NAME
    write_atomic(path, json.dumps(summaries, indent=2) + "\n")
    print(f"comparison written to {path}", file=io.stdout, flush=True)


def _cmd_simulate(args: argparse.Namespace, io: _Io) -> int:
    from balloonist.live import summary_table
    from balloonist.sim.scenario import load_scenario_or_demo

    scenario = load_scenario_or_demo(args.scenario)
    _check_policy(args.policy)
    report_dir: Path | None = args.report
    if report_dir is not None:
        # matplotlib is slow to import: only a run that writes a report pays for it
        from balloonist import report

        report.check_report_dir(report_dir)
    policy = args.policy or scenario.policy_name
    title = f"{scenario.name} (policy {policy})"

    # With --json stdout carries the JSON object and nothing else; progress may go to
    # stderr, and only when a person is watching it.
    view_stream = io.stderr if args.json else io.stdout
    console = Console(file=view_stream)
    watched = view_stream.isatty()
    view: AbstractContextManager[ProgressCallback | None]
    if args.json and not watched:
        view = nullcontext(None)
    else:
        view = _progress_view(
            console, view_stream, live=watched and not args.no_live, title=title, pace_s=0.0
        )
    with view as progress:
        result = io.runner()(scenario, policy_name=args.policy, progress=progress)

    if report_dir is not None:
        from balloonist import report

        report.write_report(result, report_dir)
    if args.json:
        print(json.dumps(result.summary()), file=io.stdout, flush=True)
        return EXIT_OK
    out = Console(file=io.stdout)
    out.print(summary_table(result.summary()))
    if report_dir is not None:
        print(f"report written to {report_dir}", file=io.stdout, flush=True)
    return EXIT_OK


def _cmd_suite(args: argparse.Namespace, io: _Io) -> int:
    from balloonist.suite import command

    options = command.check_options(
        count=args.count,
        seed=args.seed,
        policies=args.policies,
        jobs=args.jobs,
        report=args.report,
        ray=args.ray,
    )
    command.run_suite_command(options, io.stdout)
    return EXIT_OK


def _cmd_agent_pyz(args: argparse.Namespace, io: _Io) -> int:
    from balloonist.agent.pyz import build_pyz
    from balloonist.atomicfile import staged
    from balloonist.units import format_size

    out: Path = args.output
    where = f"--output {out}"
    if out.is_dir():
        raise ConfigError("is a directory; give the file's path", where=where)
    if not out.parent.is_dir():
        raise ConfigError(f"no directory {out.parent}", where=where)
    # Built under a hidden name in the same directory and renamed, so the output is a
    # whole archive or absent, never half of one; mode 0o777 less the umask, as any
    # new executable.
    with staged(out, mode=0o777) as staging:
        build_pyz(staging)
    size = format_size(out.stat().st_size)
    print(f"agent written to {out} ({size})", file=io.stdout, flush=True)
    return EXIT_OK


@contextmanager
def _progress_view(
    console: Console, stream: TextIO, *, live: bool, title: str, pace_s: float
) -> Iterator[ProgressCallback | None]:
    from balloonist.live import LiveView, ProgressLines

    if live:
        with LiveView(console, title=title, min_period_wall_s=pace_s) as view:
            yield view
    else:
        yield ProgressLines(stream)
