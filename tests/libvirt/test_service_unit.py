"""The systemd unit we ship, ``contrib/balloonist-libvirt.service``, run the way systemd
runs it, against the test libvirtd (``vm``: it needs libvirtd, not a guest).

There is no systemd here, so the test does what the unit says: it takes ExecStart's
command line (the program swapped for this checkout's balloonist, the host.toml and
state directory for temporary ones, the state directory checked to be the unit's
RuntimeDirectory), starts it as ``Type=exec`` does, waits until the daemon answers on
its API, then stops it with the unit's KillSignal. A clean stop must exit 0, or
``Restart=on-failure`` would start it again. STOP_TIMEOUT_S: a period is 1 s; systemd
itself waits 90 s before SIGKILL.
"""

from __future__ import annotations

import configparser
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from balloonist.api.client import ApiClient, ApiClientError

from ..waiting import wait_until
from .conftest import Libvirtd

pytestmark = pytest.mark.vm

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "balloonist-libvirt.service"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


def read_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    unit.read_string(path.read_text())
    return unit


def answers(socket: Path) -> bool:
    if not socket.exists():
        return False
    try:
        with ApiClient.unix(socket) as client:
            client.status()
    except ApiClientError:  # not listening yet, or no period run yet
        return False
    return True


def test_the_shipped_unit_starts_the_daemon_and_stops_it_cleanly(
    libvirtd: Libvirtd, tmp_path: Path
) -> None:
    service = read_unit(UNIT)["Service"]
    assert service["Type"] == "exec" and service["KillSignal"] == "SIGTERM"
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "balloonist" and argv[1] == "daemon", argv
    args = argv[2:]
    state_dir = Path(args[args.index("--state-dir") + 1])
    assert state_dir == Path("/run") / service["RuntimeDirectory"]
    config = args.index("--config") + 1
    host_toml = tmp_path / "host.toml"
    host_toml.write_text("")  # the unit's comment: an empty file takes every default
    args[config] = str(host_toml)
    args[args.index("--state-dir") + 1] = str(tmp_path / "state")
    proc = subprocess.Popen(
        [sys.executable, "-m", "balloonist", "daemon", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        socket = tmp_path / "state" / "api.sock"
        wait_until(
            lambda: proc.poll() is not None or answers(socket),
            START_TIMEOUT_S,
            "the daemon to answer on its API",
        )
        assert proc.poll() is None, proc.communicate()[0]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=STOP_TIMEOUT_S)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
