"""``balloonist vm ...`` and ``balloonist guest-assets``: real QEMU guests from the shell.

Bad input (an unknown VM, a socket nobody answers on, a size without a unit, min above
max) is a :class:`ConfigError`: one line, exit code 2, nothing recorded.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any, TextIO

from balloonist.config import add_former_cpu_flags
from balloonist.errors import BackendError, ConfigError
from balloonist.qemu import launcher
from balloonist.qemu.assets import default_cache_dir, ensure_guest_assets
from balloonist.units import format_size, parse_size_option


def add_commands(sub: Any, run: Any) -> None:
    """Register the commands on the top-level subparsers; ``run`` wraps a handler."""
    assets = sub.add_parser(
        "guest-assets",
        help="build (or find) the kernel and initramfs of balloonist's test guests",
        description="Download Debian's kernel and busybox with apt-get and build the "
        "initramfs of the test and demo guests. Cached; rebuilt only when missing.",
    )
    assets.add_argument("--cache", type=Path, default=None, metavar="DIR")
    assets.set_defaults(command=run(_cmd_assets))

    from balloonist import daemoncli as daemon_command

    daemon = sub.add_parser(
        "daemon",
        help="manage the recorded VMs' memory (or a simulated host's), every period, until stopped",
        description="Run the scheduler over the VMs in the state directory: sample the "
        "host and each guest, decide with the policy, move balloons in paced steps. "
        "With --sim, over a simulated host in accelerated time instead, no VMs needed. "
        "SIGINT or SIGTERM stop it; guests keep the memory they have.",
    )
    daemon_command.add_arguments(daemon)
    daemon.set_defaults(command=run(daemon_command.command))

    vdemo = sub.add_parser(
        "demo-vm",
        help="three real guests under the daemon: watch memory move",
        description="Boot three small test guests under the daemon with a shared budget; "
        "one grows, the others go idle; show the memory moving, then write a PNG.",
    )
    vdemo.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    vdemo.add_argument("--out", type=Path, default=Path("balloonist-demo"), metavar="DIR")
    vdemo.add_argument("--no-live", action="store_true", help="plain lines")
    vdemo.add_argument("--duration", type=float, default=90.0, metavar="SECONDS")
    vdemo.set_defaults(command=run(_cmd_demo_vm))

    _add_vm_commands(sub, run)

    from balloonist import libvirtcli

    libvirtcli.add_commands(sub, run)


def _add_vm_commands(sub: Any, run: Any) -> None:
    """``balloonist vm start|attach|list|stop``."""
    vm = sub.add_parser("vm", help="start, adopt, list and stop QEMU guests")
    vm.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"where VMs are recorded (default: {launcher.default_state_dir()})",
    )
    vsub = vm.add_subparsers(title="vm commands", required=True, metavar="COMMAND")

    _add_vm_start(vsub, run)

    attach = vsub.add_parser("attach", help="adopt a QEMU started elsewhere, by its QMP socket")
    attach.add_argument("name")
    attach.add_argument("--qmp", type=Path, required=True, metavar="SOCKET")
    _policy_args(attach)
    attach.set_defaults(command=run(_cmd_attach))

    listing = vsub.add_parser("list", help="the recorded VMs")
    listing.set_defaults(command=run(_cmd_list))

    stop = vsub.add_parser("stop", help="stop a VM we started, or forget an adopted one")
    stop.add_argument("name")
    stop.set_defaults(command=run(_cmd_stop))


def _add_vm_start(vsub: Any, run: Any) -> None:
    start = vsub.add_parser("start", help="start a detached guest with a balloon")
    start.add_argument("name")
    start.add_argument("--memory", required=True, metavar="SIZE")
    _policy_args(start)
    start.add_argument("--cpus", type=int, default=1)
    start.add_argument(
        "--min-cpus",
        type=int,
        default=1,
        metavar="N",
        help="processors always granted (agent VMs whose processors the daemon shares)",
    )
    start.add_argument("--max-cpus", type=int, default=None, metavar="N", help="processor limit")
    add_former_cpu_flags(start)
    start.add_argument("--cpu-shares", type=int, default=1000, metavar="N")
    start.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    start.add_argument("--kernel", type=Path)
    start.add_argument("--initrd", type=Path)
    start.add_argument("--append", default="")
    start.add_argument("--disk", type=Path, metavar="IMAGE")
    start.add_argument(
        "--test-guest",
        action="store_true",
        help="boot balloonist's own test guest (see 'balloonist guest-assets')",
    )
    start.add_argument(
        "--agent",
        action="store_true",
        help="RAM in a shared file under /dev/shm and a virtio-serial port for the "
        "in-guest balloon agent (the virtio balloon stays too)",
    )
    start.add_argument(
        "--no-free-page-reporting",
        dest="free_page_reporting",
        action="store_false",
        help="keep memory the guest frees until its balloon takes it (free page "
        "reporting, on by default, gives it back to the host within seconds)",
    )
    start.add_argument(
        "--virtio-mem",
        metavar="SIZE",
        help="a hot-pluggable region of SIZE beside --memory (virtio-mem, in 2 MiB "
        "blocks): the daemon resizes the guest through it instead of a balloon, "
        "between --memory and --memory plus SIZE",
    )
    start.add_argument(
        "--workload",
        metavar="SCHEDULE",
        help="test guest only: WS_MIB@T_S,... for its touchmem workload",
    )
    start.set_defaults(command=run(_cmd_start))


def _policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min", metavar="SIZE", help="reservation (default 0)")
    p.add_argument("--max", metavar="SIZE", help="limit (default: the VM's memory)")
    p.add_argument("--shares", type=int, default=1000)


def _state(args: argparse.Namespace) -> launcher.StateDir:
    return launcher.StateDir(args.state_dir or launcher.default_state_dir())


def _cmd_assets(args: argparse.Namespace, out: TextIO) -> int:
    cache = args.cache or default_cache_dir()
    assets = ensure_guest_assets(cache, progress=lambda msg: print(msg, file=out, flush=True))
    print(f"kernel {assets.kernel}\ninitrd {assets.initrd}", file=out)
    return 0


def _cmd_start(args: argparse.Namespace, out: TextIO) -> int:
    memory = parse_size_option(args.memory, "--memory")
    assert memory is not None  # required by argparse
    kernel, initrd, append = args.kernel, args.initrd, args.append
    if args.test_guest:
        if kernel is not None or args.disk is not None:
            raise ConfigError("--test-guest brings its own kernel; drop --kernel/--disk")
        assets = ensure_guest_assets(default_cache_dir())
        kernel, initrd = assets.kernel, assets.initrd
        append = f"{append} quiet".strip()
    if args.workload:
        if not args.test_guest:
            raise ConfigError("--workload is for --test-guest only", where="--workload")
        append = f"{append} balloonist.work={args.workload}"
    request = launcher.StartRequest(
        name=args.name,
        memory_bytes=memory,
        min_bytes=parse_size_option(args.min, "--min") or 0,
        max_bytes=parse_size_option(args.max, "--max"),
        shares=args.shares,
        cpus=args.cpus,
        min_cpus=args.min_cpus,
        max_cpus=args.max_cpus,
        cpu_shares=args.cpu_shares,
        accel=args.accel,
        kernel=kernel,
        initrd=initrd,
        append=append,
        disk=args.disk,
        agent=args.agent,
        free_page_reporting=args.free_page_reporting,
        virtio_mem_bytes=parse_size_option(args.virtio_mem, "--virtio-mem"),
    )
    record = launcher.start_vm(_state(args), request)
    agent = f"; agent {record.agent_socket}, RAM {record.ram_file}" if record.agent else ""
    if record.virtio_mem_bytes is not None:
        agent += f"; virtio-mem up to {format_size(record.memory_bytes)}"
    print(
        f"started {record.name} (pid {record.pid}, {record.accel}); QMP {record.qmp_socket}"
        + agent,
        file=out,
    )
    return 0


def _cmd_attach(args: argparse.Namespace, out: TextIO) -> int:
    from balloonist.qemu.qmp import BalloonQMP

    launcher.check_name(args.name)

    async def probe() -> int:
        async with BalloonQMP(args.qmp, name=args.name) as qmp:
            return await qmp.base_memory_bytes()

    try:
        memory = asyncio.run(probe())
    except BackendError as exc:
        # An unreachable socket or a VM without a balloon is bad input to 'attach'.
        raise ConfigError(str(exc), where="--qmp") from None
    record = launcher.adopt_vm(
        _state(args),
        args.name,
        args.qmp,
        memory_bytes=memory,
        min_bytes=parse_size_option(args.min, "--min") or 0,
        max_bytes=parse_size_option(args.max, "--max"),
        shares=args.shares,
    )
    print(f"adopted {record.name} ({format_size(record.memory_bytes)})", file=out)
    return 0


def _cmd_list(args: argparse.Namespace, out: TextIO) -> int:
    state = _state(args)
    names = state.names()
    if not names:
        print("no VMs recorded", file=out)
        return 0
    print(
        f"{'NAME':16} {'STATE':8} {'MEMORY':>8} {'MIN':>8} {'MAX':>8} {'SHARES':>7} "
        f"{'AGENT':5}  QMP",
        file=out,
    )
    for name in names:
        r = state.load(name)
        status = "running" if r.running() else "gone"
        print(
            f"{r.name:16} {status:8} {format_size(r.memory_bytes):>8} "
            f"{format_size(r.min_bytes):>8} {format_size(r.max_bytes):>8} {r.shares:>7} "
            f"{'yes' if r.agent else 'no':5}  {r.qmp_socket}",
            file=out,
        )
    return 0


def _cmd_demo_vm(args: argparse.Namespace, out: TextIO) -> int:
    from balloonist.vmdemo import run_vm_demo

    if not 10.0 <= args.duration <= 3600.0:
        raise ConfigError("must be between 10 and 3600 seconds", where="--duration")
    live = out.isatty() and not args.no_live
    plot = run_vm_demo(args.out, accel=args.accel, live=live, stdout=out, duration_s=args.duration)
    print(f"plot written to {plot}", file=out)
    return 0


def _cmd_stop(args: argparse.Namespace, out: TextIO) -> int:
    launcher.stop_vm(_state(args), args.name)
    print(f"stopped {args.name}", file=out)
    return 0
