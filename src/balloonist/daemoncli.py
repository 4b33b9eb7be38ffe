"""``balloonist daemon``: its arguments, checking them, building the daemon, running it
beside its API server (so it sits above both packages, with the other commands).

The command in three steps, so servers can be started beside the loop::

    request = daemon_request(args)     # every input checked; bad input: ConfigError
    daemon = request.build()           # reads the state file, connects to nothing yet
    run_daemon(daemon, stop)           # periods until stop is set (SIGINT, SIGTERM)

``daemon`` is a :class:`~balloonist.daemon.service.DaemonLoop`, which is also the
:class:`~balloonist.daemon.control.Controller` that an API server serves from its own
thread while ``run_daemon`` runs the loop in the calling one.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from balloonist.errors import ConfigError

if TYPE_CHECKING:  # imported when used: the simulator and QMP are slow to import
    from balloonist.daemon.config import DaemonConfig
    from balloonist.daemon.service import DaemonLoop
    from balloonist.sim.scenario import Scenario

#: The API's unix socket, in the daemon's state directory unless --api-socket says.
API_SOCKET = "api.sock"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="host.toml (see docs/daemon.md)"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where VMs are recorded and the daemon keeps daemon-state.json (default: "
        "balloonist's runtime directory; with --sim, a directory per scenario under it)",
    )
    parser.add_argument("--log-level", choices=("debug", "info", "warning"), default="info")
    parser.add_argument(
        "--sim",
        nargs="?",
        const="",
        default=None,
        metavar="SCENARIO.toml",
        help="manage a simulated host instead of QEMU VMs: the scenario's guests "
        "(default: the built-in demo scenario)",
    )
    parser.add_argument(
        "--libvirt",
        nargs="?",
        const="",
        default=None,
        metavar="URI",
        help="manage libvirt domains instead of the recorded VMs (default URI: host.toml's "
        "[daemon] uri, else qemu:///system; docs/libvirt.md)",
    )
    parser.add_argument(
        "--speed",
        type=float,
        default=None,
        metavar="X",
        help="with --sim: simulated seconds per wall-clock second (default 1)",
    )
    api = parser.add_argument_group("API (docs/operations.md)")
    api.add_argument(
        "--api-socket",
        type=Path,
        metavar="PATH",
        help="serve the REST API and /metrics on this unix socket, mode 0600 (default: "
        "api.sock in the state directory)",
    )
    api.add_argument(
        "--api-tcp",
        metavar="[HOST:]PORT",
        help="also serve them over TCP (loopback unless HOST says otherwise); needs "
        "--api-token-file",
    )
    api.add_argument(
        "--api-token-file",
        type=Path,
        metavar="FILE",
        help="the bearer token TCP clients (and the dashboard) must send; the file must be "
        "its owner's only; a file that does not exist is created with a new random token",
    )
    api.add_argument("--no-api", action="store_true", help="serve no API at all")


@dataclass(frozen=True)
class DaemonRequest:
    """A checked ``balloonist daemon`` command line; ``build`` makes the daemon."""

    state_dir: Path | None
    config: DaemonConfig | None = None  # QEMU
    scenario: Scenario | None = None  # --sim
    speed: float = 1.0
    libvirt_uri: str | None = None  # the libvirt backend, over this connection
    api: bool = True
    api_socket: Path | None = None  # None: api.sock in the state directory
    api_tcp: tuple[str, int] | None = None
    api_token: str | None = field(default=None, repr=False)  # never printed

    def build(self) -> DaemonLoop:
        if self.scenario is not None:
            from balloonist.daemon.sim_backend import default_sim_state_dir, sim_daemon

            state_dir = self.state_dir or default_sim_state_dir(self.scenario)
            return sim_daemon(self.scenario, state_dir=state_dir, speed=self.speed)
        from balloonist.daemon.service import Daemon
        from balloonist.qemu.launcher import StateDir, default_state_dir

        assert self.config is not None  # daemon_request gives one of the two
        state = StateDir(self.state_dir or default_state_dir())
        if self.libvirt_uri is None:
            return Daemon(self.config, state)
        from balloonist.libvirt.connection import Libvirt
        from balloonist.libvirt.source import LibvirtVms

        libvirt = Libvirt(self.libvirt_uri, events=True)
        libvirt.open()  # an unreachable URI: one line, exit 2, before anything runs
        return Daemon(self.config, state, source=LibvirtVms(libvirt, self.config))


def daemon_request(args: argparse.Namespace) -> DaemonRequest:
    """Check every input before anything runs (ConfigError: one line, exit code 2)."""
    return replace(_backend_request(args), **_api_options(args))


def _api_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.no_api:
        for flag, value in (
            ("--api-socket", args.api_socket),
            ("--api-tcp", args.api_tcp),
            ("--api-token-file", args.api_token_file),
        ):
            if value is not None:
                raise ConfigError("makes no sense with --no-api", where=flag)
        return {"api": False}
    from balloonist.api.server import parse_tcp_address, read_or_create_token

    tcp = parse_tcp_address(args.api_tcp) if args.api_tcp is not None else None
    if tcp is not None and args.api_token_file is None:
        raise ConfigError("TCP clients must present a token: give one", where="--api-token-file")
    token = read_or_create_token(args.api_token_file) if args.api_token_file is not None else None
    return {"api_socket": args.api_socket, "api_tcp": tcp, "api_token": token}


def _backend_request(args: argparse.Namespace) -> DaemonRequest:
    if args.sim is None:
        if args.speed is not None:
            raise ConfigError("is for --sim only", where="--speed")
        from balloonist.daemon.config import load_config

        config = load_config(args.config)
        uri = None
        if args.libvirt is not None or config.daemon.backend == "libvirt":
            from balloonist.libvirt.connection import DEFAULT_URI, import_libvirt

            import_libvirt()  # without libvirt-python: one line saying what to install
            uri = args.libvirt or config.daemon.uri or DEFAULT_URI
        return DaemonRequest(state_dir=args.state_dir, config=config, libvirt_uri=uri)
    if args.libvirt is not None:
        raise ConfigError("a simulated host has no libvirt domains; drop one", where="--libvirt")
    if args.config is not None:
        raise ConfigError(
            "a simulated host is configured by its scenario; drop --config", where="--config"
        )
    from balloonist.daemon.sim_backend import check_speed

    speed = check_speed(1.0 if args.speed is None else args.speed)
    from balloonist.sim.scenario import load_scenario_or_demo

    scenario = load_scenario_or_demo(Path(args.sim) if args.sim else None)
    return DaemonRequest(state_dir=args.state_dir, scenario=scenario, speed=speed)


def configure_logging(level: str, stream: TextIO) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(message)s", stream=stream
    )


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM (call from the main thread)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def run_daemon(daemon: DaemonLoop, stop: threading.Event) -> None:
    """Run the daemon's periods in this thread until ``stop`` is set."""
    daemon.run(stop)


def command(args: argparse.Namespace, out: TextIO) -> int:
    """``balloonist daemon``."""
    request = daemon_request(args)  # bad input: one line, exit 2, before anything runs
    configure_logging(args.log_level, out)
    stop = stop_on_signals()
    daemon = request.build()
    if not request.api:
        run_daemon(daemon, stop)
        return 0
    from balloonist.api.server import serve

    # The API serves from its own threads, with the daemon as its Controller.
    server = serve(
        daemon,
        unix_socket=request.api_socket or daemon.state_path.parent / API_SOCKET,
        tcp=request.api_tcp,
        token=request.api_token,
    )
    try:
        run_daemon(daemon, stop)
    finally:
        server.stop()
    return 0


__all__ = [
    "DaemonRequest",
    "add_arguments",
    "command",
    "configure_logging",
    "daemon_request",
    "run_daemon",
    "stop_on_signals",
]
