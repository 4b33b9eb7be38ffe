"""``balloonist status``, ``set`` and ``watch``: the running daemon from the shell,
through its REST API (balloonist.api.client).

Which daemon: ``--api-socket PATH``, or ``--state-dir DIR`` (meaning ``DIR/api.sock``),
or ``--api-url URL`` with ``--api-token-file FILE``; by default the QEMU daemon's
socket, ``api.sock`` in ``launcher.default_state_dir()``. A ``--sim`` daemon keeps its
socket elsewhere (``sim/<scenario>/`` under that directory): name it.

Exit codes (cli.py): 2 for bad input, which includes what the daemon refuses (a bad
value, 422; an unknown guest, 404; a wrong token, 401); 1 when no daemon answers, it
is not ready yet (503), or it goes away. ``watch`` ends with 0 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from balloonist.config import add_former_cpu_flags
from balloonist.daemoncli import API_SOCKET
from balloonist.errors import ConfigError
from balloonist.units import format_size, parse_size_bytes

if TYPE_CHECKING:
    # The API client pulls in fastapi and pydantic models: imported only when a command
    # talks to a daemon, so building the command line stays cheap for every command.
    from balloonist.api.client import ApiClient
    from balloonist.api.models import GuestOut, StatusOut

#: The guest table's columns: heading and how to show a guest's value.
_COLUMNS: Final = (
    ("name", lambda g: g.name),
    ("memory", lambda g: format_size(g.memory_bytes)),
    ("min", lambda g: format_size(g.min_bytes)),
    ("max", lambda g: format_size(g.max_bytes)),
    ("shares", lambda g: str(g.shares)),
    ("working set", lambda g: format_size(g.working_set_bytes)),
    ("target", lambda g: format_size(g.allocation_target_bytes)),
    ("allocated", lambda g: format_size(g.allocated_bytes)),
    ("balloon", lambda g: format_size(g.balloon_bytes)),
    ("cooperative", lambda g: "yes" if g.cooperative else "NO"),
)

#: Columns for processors, shown when some guest's processors are shared.
_CPU_COLUMNS: Final = (
    ("vCPUs online", lambda g: "-" if g.cpu is None else f"{g.cpu.online_vcpus}/{g.cpu.vcpus}"),
    ("CPU target", lambda g: "-" if g.cpu is None else str(g.cpu.allocation_target_cpus)),
    ("CPU demand", lambda g: "-" if g.cpu is None else f"{g.cpu.demand_vcpus:.1f}"),
    ("CPU shares", lambda g: "-" if g.cpu is None else str(g.cpu.shares)),
)


def _columns(status: StatusOut) -> tuple[tuple[str, Callable[[GuestOut], str]], ...]:
    if any(g.cpu is not None for g in status.guests):
        return (*_COLUMNS, *_CPU_COLUMNS)
    return _COLUMNS


def default_socket() -> Path:
    from balloonist.qemu.launcher import default_state_dir

    return default_state_dir() / API_SOCKET


def add_commands(sub: Any, run: Any) -> None:
    """Register the commands on the top-level subparsers; ``run`` wraps a handler."""
    status = sub.add_parser(
        "status",
        help="the running daemon's host and guests, once",
        description="Print the daemon's newest period: host state and memory, and per "
        "guest its spec, working-set estimate, target, allocation and balloon.",
    )
    _connection_args(status)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(command=run(_cmd_status))

    change = sub.add_parser(
        "set",
        help="change a guest's min, max or shares in the running daemon",
        description="Change a guest's reservation, limit or shares; the daemon checks "
        "the change at once and applies it at the start of its next period.",
    )
    change.add_argument("name", metavar="NAME", help="the guest")
    change.add_argument("--min", metavar="SIZE", help="reservation, with a unit (512MiB)")
    change.add_argument("--max", metavar="SIZE", help="limit, with a unit (2GiB)")
    change.add_argument("--shares", type=int, metavar="N", help="shares, 1 or more")
    change.add_argument(
        "--min-cpus", type=int, metavar="N", help="processor reservation (shared processors)"
    )
    change.add_argument("--max-cpus", type=int, metavar="N", help="processor limit")
    add_former_cpu_flags(change)
    change.add_argument("--cpu-shares", type=int, metavar="N", help="processor shares")
    _connection_args(change)
    change.set_defaults(command=run(_cmd_set))

    watch = sub.add_parser(
        "watch",
        help="follow the running daemon, one update per period, until Ctrl-C",
        description="Show the status table again at every period (a live table at a "
        "terminal, one line per period otherwise) until Ctrl-C.",
    )
    watch.add_argument("--count", type=int, metavar="N", help="stop after N updates")
    _connection_args(watch)
    watch.set_defaults(command=run(_cmd_watch))


def _connection_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "daemon", f"which daemon to ask (default: the socket {default_socket()})"
    )
    where = group.add_mutually_exclusive_group()
    where.add_argument("--api-socket", type=Path, metavar="PATH", help="the daemon's unix socket")
    where.add_argument(
        "--state-dir", type=Path, metavar="DIR", help="the daemon's state directory: DIR/api.sock"
    )
    where.add_argument(
        "--api-url", metavar="URL", help="the daemon's TCP listener, e.g. http://127.0.0.1:8080"
    )
    group.add_argument(
        "--api-token-file",
        type=Path,
        metavar="FILE",
        help="with --api-url: the bearer token (the file must be its owner's only)",
    )


def connect(args: argparse.Namespace) -> ApiClient:
    """The client the connection options name; bad options: ConfigError."""
    from balloonist.api.client import ApiClient

    if args.api_url is None:
        if args.api_token_file is not None:
            raise ConfigError(
                "is for --api-url (the unix socket needs no token)", where="--api-token-file"
            )
        if args.api_socket is not None:
            return ApiClient.unix(args.api_socket)
        if args.state_dir is not None:
            return ApiClient.unix(args.state_dir / API_SOCKET)
        return ApiClient.unix(default_socket())
    token = None
    if args.api_token_file is not None:
        from balloonist.api.server import read_token

        token = read_token(args.api_token_file)
    return ApiClient.tcp(args.api_url, token=token)


# ---------------------------------------------------------------------------------------
# Commands


def _cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    with connect(args) as api:
        if args.json:
            print(json.dumps(api.status_json()), file=out, flush=True)
            return 0
        status = api.status()
    if out.isatty():
        Console(file=out).print(render_status(status))
    else:
        out.write(status_text(status))
        out.flush()
    return 0


def _cmd_set(args: argparse.Namespace, out: TextIO) -> int:
    numbers = {
        "--shares": args.shares,
        "--min-cpus": args.min_cpus,
        "--max-cpus": args.max_cpus,
        "--cpu-shares": args.cpu_shares,
    }
    if args.min is None and args.max is None and all(v is None for v in numbers.values()):
        raise ConfigError(
            "nothing to change: give --min, --max, --shares, --min-cpus, --max-cpus or --cpu-shares"
        )
    for flag, text in (("--min", args.min), ("--max", args.max)):
        if text is not None:
            try:
                parse_size_bytes(text)
            except ConfigError as exc:
                raise ConfigError(exc.message, where=flag) from None
    for flag, number in numbers.items():
        if number is not None and number < 1:
            raise ConfigError(f"must be 1 or more, got {number}", where=flag)
    with connect(args) as api:
        accepted = api.change_guest(
            args.name,
            min=args.min.strip() if args.min is not None else None,
            max=args.max.strip() if args.max is not None else None,
            shares=args.shares,
            min_cpus=args.min_cpus,
            max_cpus=args.max_cpus,
            cpu_shares=args.cpu_shares,
        )
    parts = []
    if accepted.min_bytes is not None:
        parts.append(f"min {format_size(accepted.min_bytes)}")
    if accepted.max_bytes is not None:
        parts.append(f"max {format_size(accepted.max_bytes)}")
    if accepted.shares is not None:
        parts.append(f"shares {accepted.shares}")
    for label, number in (
        ("min_cpus", accepted.min_cpus),
        ("max_cpus", accepted.max_cpus),
        ("cpu_shares", accepted.cpu_shares),
    ):
        if number is not None:
            parts.append(f"{label} {number}")
    print(
        f"{accepted.name}: {', '.join(parts)} accepted; applies at the next period",
        file=out,
        flush=True,
    )
    return 0


def _cmd_watch(args: argparse.Namespace, out: TextIO) -> int:
    count: int | None = args.count
    if count is not None and count < 1:
        raise ConfigError(f"must be 1 or more, got {count}", where="--count")
    with connect(args) as api:
        try:
            if out.isatty():
                console = Console(file=out)
                with Live(console=console, auto_refresh=False) as live:
                    for seen, status in enumerate(api.events(), 1):
                        live.update(render_status(status), refresh=True)
                        if count is not None and seen >= count:
                            break
            else:
                for seen, status in enumerate(api.events(), 1):
                    print(status_line(status), file=out, flush=True)
                    if count is not None and seen >= count:
                        break
        except KeyboardInterrupt:
            pass  # the way to stop watching: not an error
    return 0


# ---------------------------------------------------------------------------------------
# Views


def _heading(status: StatusOut) -> str:
    return (
        f"period {status.version}, t={status.time_s:.1f}s, policy {status.policy.name} "
        f"(tax {status.policy.tax_rate:g})"
    )


def _host_text(status: StatusOut) -> str:
    host = status.host
    cpus = "" if host.cpus is None else f", {host.cpus} processors shared"
    return (
        f"host {host.state}: memory {format_size(host.memory_bytes)}, free "
        f"{format_size(host.free_bytes)}, swap used {format_size(host.swap_used_bytes)} "
        f"of {format_size(host.swap_bytes)}{cpus}"
    )


def render_status(status: StatusOut) -> RenderableType:
    """The status for a terminal: host line above a table of guests."""
    table = Table()
    columns = _columns(status)
    for heading, _ in columns:
        table.add_column(heading, justify="left" if heading == "name" else "right")
    for guest in status.guests:
        cells = [show(guest) for _, show in columns]
        style = None if guest.cooperative else "red"
        table.add_row(*cells, style=style)
    return Group(Text(_heading(status), style="bold"), Text(_host_text(status)), table)


def status_text(status: StatusOut) -> str:
    """The status as plain text (no colour, no box drawing), for pipes and logs."""
    columns = _columns(status)
    rows = [[heading for heading, _ in columns]]
    rows += [[show(g) for _, show in columns] for g in status.guests]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = [_heading(status), _host_text(status)]
    for row in rows:
        cells = [
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def _guest_brief(guest: GuestOut) -> str:
    flag = "" if guest.cooperative else " UNCOOPERATIVE"
    return (
        f"{guest.name} alloc={format_size(guest.allocated_bytes)} "
        f"target={format_size(guest.allocation_target_bytes)} "
        f"balloon={format_size(guest.balloon_bytes)} "
        f"ws={format_size(guest.working_set_bytes)}{flag}"
    )


def status_line(status: StatusOut) -> str:
    """One line per period for ``watch`` without a terminal."""
    host = status.host
    parts = [
        f"period {status.version} t={status.time_s:.1f}s host {host.state} "
        f"free={format_size(host.free_bytes)}"
    ]
    parts += [_guest_brief(g) for g in status.guests]
    return " | ".join(parts)


__all__ = ["add_commands", "connect", "default_socket", "render_status", "status_line"]
