"""balloonist-agent's command line (one-line errors, exit 2 for bad arguments) and
finding the port without udev."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from balloonist.agent import protocol as proto
from balloonist.agent.main import main
from balloonist.agent.port import find_port
from balloonist.errors import BackendError


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "usage: balloonist-agent" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--floor-mib", "-1"], "balloonist-agent: error: --floor-mib: must be"),
        (["--step-s", "0"], "balloonist-agent: error: --step-s: must be between"),
        (["--stats-s", "-1"], "balloonist-agent: error: --stats-s: must be between"),
        (["--psi-limit", "101"], "balloonist-agent: error: --psi-limit: must be a percentage"),
        (["--rate-start", "0"], "balloonist-agent: error: --rate-start: must be above 0"),
        (["--rate-increase", "-1"], "balloonist-agent: error: --rate-increase: must be MiB/s"),
        (["--rate-max", "2"], "balloonist-agent: error: --rate-max: must not be below"),
    ],
)
def test_bad_values_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_rate_flags_set_the_per_step_limits() -> None:
    from balloonist.agent.main import AgentConfig, rate_limits_for
    from balloonist.rate import RateLimits

    # the defaults are the shared controller's, per second, scaled to the 0.2 s step
    default, base = rate_limits_for(AgentConfig()), RateLimits()
    assert (default.min_units, default.increase_units, default.max_units) == tuple(
        round(p * 0.2) for p in (base.min_units, base.increase_units, base.max_units)
    )
    fast = rate_limits_for(AgentConfig(step_s=0.5, rate_start_mib_s=100, rate_max_mib_s=200))
    assert (fast.min_units, fast.max_units) == (100 * 256 // 2, 200 * 256 // 2)


def test_unknown_flags_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_port_is_the_udev_symlink_when_there_is_one(tmp_path: Path) -> None:
    link = tmp_path / "dev/virtio-ports" / proto.PORT_NAME
    link.parent.mkdir(parents=True)
    link.touch()
    assert find_port(tmp_path / "dev", tmp_path / "sys") == link


def test_without_udev_the_port_is_found_by_its_name_in_sysfs(tmp_path: Path) -> None:
    sys_ports = tmp_path / "sys"
    for vport, name in (("vport0p1", "org.qemu.guest_agent.0"), ("vport1p2", proto.PORT_NAME)):
        (sys_ports / vport).mkdir(parents=True)
        (sys_ports / vport / "name").write_text(name + "\n")
    (sys_ports / "vport2p1").mkdir()  # a port without a name file
    assert find_port(tmp_path / "dev", sys_ports) == tmp_path / "dev/vport1p2"


def test_no_port_is_a_backend_error_naming_the_port(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=proto.PORT_NAME):
        find_port(tmp_path / "dev", tmp_path / "sys")


@pytest.mark.root(reason="needs root (to drop CAP_SYS_ADMIN with setpriv)")
def test_without_cap_sys_admin_the_agent_stops_at_start_with_one_line() -> None:
    agent = [sys.executable, "-m", "balloonist.agent", "--no-tune", "--port", "/nonexistent"]
    result = subprocess.run(
        ["setpriv", "--bounding-set=-sys_admin", *agent],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("balloonist-agent: error: ")
    assert "CAP_SYS_ADMIN" in result.stderr and result.stderr.count("\n") == 1
