"""``balloonist libvirt list|manage|unmanage``: choose the libvirt domains balloonist manages.

``manage`` opts a domain in and writes its settings into the domain's own XML
metadata (live and persistent), so ``virsh dumpxml`` shows them and they travel with
the domain; a running daemon picks the domain up within a period. Bad input (an
unreachable URI, an unknown domain, a size without a unit, min above max) is a
:class:`ConfigError`: one line, exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from balloonist.config import add_former_cpu_flags
from balloonist.errors import ConfigError
from balloonist.units import format_size, parse_size_option

if TYPE_CHECKING:  # libvirt-python is optional: imported when a command runs
    from balloonist.daemon.config import DaemonConfig
    from balloonist.libvirt.connection import Libvirt
    from balloonist.libvirt.domain_xml import DomainSettings

T = TypeVar("T")

URI_HELP = "libvirt connection (default: qemu:///system)"


def add_commands(sub: Any, run: Any) -> None:
    """Register ``balloonist libvirt ...``; ``run`` wraps a handler."""
    lv = sub.add_parser("libvirt", help="choose which libvirt domains balloonist manages")
    lv.add_argument("--uri", default=None, metavar="URI", help=URI_HELP)
    lv.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="host.toml: its [daemon] uri, and for list its manage_all_domains",
    )
    lsub = lv.add_subparsers(title="libvirt commands", required=True, metavar="COMMAND")

    listing = lsub.add_parser("list", help="running domains: managed or not, and why")
    listing.set_defaults(command=run(_cmd_list))

    manage = lsub.add_parser("manage", help="opt a domain in, with its settings")
    manage.add_argument("name")
    manage.add_argument("--min", metavar="SIZE", help="reservation (default 0)")
    manage.add_argument("--max", metavar="SIZE", help="limit (default: the domain's memory)")
    manage.add_argument("--shares", type=int, default=None, metavar="N", help="default 1000")
    manage.add_argument("--min-cpus", type=int, default=None, metavar="N", help="default 1")
    manage.add_argument(
        "--max-cpus", type=int, default=None, metavar="N", help="default: its vCPUs"
    )
    add_former_cpu_flags(manage)
    manage.add_argument("--cpu-shares", type=int, default=None, metavar="N", help="default 1000")
    manage.set_defaults(command=run(_cmd_manage))

    unmanage = lsub.add_parser("unmanage", help="opt a domain out (its settings are kept)")
    unmanage.add_argument("name")
    unmanage.set_defaults(command=run(_cmd_unmanage))

    prepare = lsub.add_parser(
        "prepare",
        help="show (with --apply, make) the XML changes a domain needs",
        description="A virtio balloon that deflates before the guest runs out, reports "
        "free pages and statistics; with --agent, the agent's channel and shared RAM. "
        "--apply defines the new XML; a running domain gets it at its next boot.",
    )
    prepare.add_argument("name")
    prepare.add_argument("--agent", action="store_true", help="for the in-guest agent")
    prepare.add_argument(
        "--cpus", action="store_true", help="for the CPU balloon (through the agent: implies it)"
    )
    prepare.add_argument("--apply", action="store_true", help="define the new XML")
    prepare.set_defaults(command=run(_cmd_prepare))


def _config(args: argparse.Namespace) -> DaemonConfig:
    from balloonist.daemon.config import load_config

    return load_config(args.config)


def _connect(args: argparse.Namespace) -> Libvirt:
    """The connection: --uri, else host.toml's [daemon] uri (with --config), else
    qemu:///system. An unreachable URI is a ConfigError."""
    from balloonist.libvirt.connection import DEFAULT_URI, Libvirt

    libvirt = Libvirt(args.uri or _config(args).daemon.uri or DEFAULT_URI)
    libvirt.open()
    return libvirt


def _cmd_list(args: argparse.Namespace, out: TextIO) -> int:
    from balloonist.libvirt.source import LibvirtVms

    config = _config(args)
    libvirt = _connect(args)
    try:
        domains = LibvirtVms(libvirt, config).domains()
    finally:
        libvirt.close()
    print(f"{'NAME':<20} {'MEMORY':>10} {'MIN':>10} {'MAX':>10} {'SHARES':>6}  STATE", file=out)
    for d in domains:
        s = d.facts.settings

        def size(value: int | None) -> str:
            return "-" if value is None else format_size(value)

        state = "managed" if d.managed else f"unmanaged: {d.reason}"
        print(
            f"{d.facts.name:<20} {format_size(d.facts.memory_bytes):>10} "
            f"{size(s.min_bytes):>10} {size(s.max_bytes):>10} "
            f"{'-' if s.shares is None else s.shares:>6}  {state}",
            file=out,
        )
    return 0


def _cmd_manage(args: argparse.Namespace, out: TextIO) -> int:
    min_bytes, max_bytes = (
        parse_size_option(args.min, "--min"),
        parse_size_option(args.max, "--max"),
    )
    for flag, value in (
        ("--shares", args.shares),
        ("--min-cpus", args.min_cpus),
        ("--max-cpus", args.max_cpus),
        ("--cpu-shares", args.cpu_shares),
    ):
        if value is not None and value < 1:
            raise ConfigError("must be at least 1", where=flag)
    if args.min_cpus is not None and args.max_cpus is not None and args.min_cpus > args.max_cpus:
        raise ConfigError("above --max-cpus", where="--min-cpus")
    libvirt = _connect(args)
    try:
        memory = _defined_memory_bytes(libvirt, args.name)

        def update(current: DomainSettings) -> DomainSettings:
            from balloonist.libvirt.domain_xml import DomainSettings

            new = DomainSettings(
                managed=True,
                min_bytes=current.min_bytes if min_bytes is None else min_bytes,
                max_bytes=current.max_bytes if max_bytes is None else max_bytes,
                shares=current.shares if args.shares is None else args.shares,
                min_cpus=current.min_cpus if args.min_cpus is None else args.min_cpus,
                max_cpus=current.max_cpus if args.max_cpus is None else args.max_cpus,
                cpu_shares=current.cpu_shares if args.cpu_shares is None else args.cpu_shares,
            )
            low = new.min_bytes or 0
            high = memory if new.max_bytes is None else new.max_bytes
            if not low <= high <= memory:
                raise ConfigError(
                    f"min {format_size(low)} / max {format_size(high)} do not fit the "
                    f"domain's {format_size(memory)}",
                    where=args.name,
                )
            return new

        from balloonist.libvirt.metadata import write_settings

        _domain_errors(lambda: write_settings(libvirt, args.name, update), args.name)
    finally:
        libvirt.close()
    print(f"{args.name}: managed", file=out)
    return 0


def _cmd_unmanage(args: argparse.Namespace, out: TextIO) -> int:
    from dataclasses import replace

    from balloonist.libvirt.metadata import write_settings

    libvirt = _connect(args)
    try:
        _domain_errors(
            lambda: write_settings(libvirt, args.name, lambda s: replace(s, managed=False)),
            args.name,
        )
    finally:
        libvirt.close()
    print(f"{args.name}: not managed", file=out)
    return 0


def _cmd_prepare(args: argparse.Namespace, out: TextIO) -> int:
    from balloonist.libvirt.prepare import prepare

    libvirt = _connect(args)
    try:
        flags = libvirt.lib.VIR_DOMAIN_XML_INACTIVE
        name = args.name
        xml: str = _domain_errors(
            lambda: libvirt.domain_call(name, lambda d: d.XMLDesc(flags)), name
        )
        prepared = prepare(xml, agent=args.agent or args.cpus)
        for change in prepared.changes:
            print(f"{name}: {change}", file=out)
        if not prepared.changes:
            print(f"{name}: has what balloonist needs", file=out)
        elif not args.apply:
            print(f"{name}: run again with --apply to define it", file=out)
        else:
            running = libvirt.domain_call(name, lambda d: bool(d.isActive()))
            libvirt.call(lambda conn: conn.defineXML(prepared.xml), domain=name)
            later = "; it takes effect when the domain next boots" if running else ""
            print(f"{name}: defined{later}", file=out)
    finally:
        libvirt.close()
    return 0


def _defined_memory_bytes(libvirt: Libvirt, name: str) -> int:
    from balloonist.libvirt.domain_xml import parse_domain

    flags = libvirt.lib.VIR_DOMAIN_XML_INACTIVE
    xml: str = _domain_errors(lambda: libvirt.domain_call(name, lambda d: d.XMLDesc(flags)), name)
    return parse_domain(xml).memory_bytes


def _domain_errors(call: Callable[[], T], name: str) -> T:
    """``call()``, with "no such domain" as bad input rather than a failure."""
    from balloonist.libvirt.connection import LibvirtError

    try:
        return call()
    except LibvirtError as exc:
        if exc.no_domain:
            raise ConfigError("no such domain", where=name) from None
        raise


__all__ = ["add_commands"]
