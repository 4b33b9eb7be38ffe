"""``balloonist vm`` bad input: one line on stderr, exit 2, nothing recorded (no QEMU needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from balloonist.cli import main
from balloonist.errors import ConfigError
from balloonist.qemu import launcher

#: A virtio-mem VM up to the point of its region's size (the kernel exists).
VMEM = ["start", "g", "--memory", "256MiB", "--kernel", "/bin/sh", "--virtio-mem"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["stop", "nope"], "unknown VM 'nope'"),
        (["attach", "x", "--qmp", "/nonexistent/qmp.sock"], "cannot connect to QMP"),
        (["start", "g", "--memory", "512", "--test-guest"], "--memory: size '512' has no unit"),
        (["start", "g", "--memory", "512MiB", "--min", "600MiB", "--kernel", "/k"], "above --max"),
        (["start", "bad/name", "--memory", "512MiB", "--kernel", "/k"], "VM name"),
        (["start", "g", "--memory", "512MiB"], "give either --kernel"),
        *(
            (
                [*VMEM, size],
                expected,
            )
            for size, expected in (
                ("512", "--virtio-mem: size '512' has no unit"),
                ("100TiB", "--virtio-mem: 100.0TiB in all is above the host's memory"),
                ("3MiB", "--virtio-mem: must be a positive whole number of 2MiB blocks"),
            )
        ),
        (
            [*VMEM, "64MiB", "--agent"],
            "--virtio-mem: an agent VM's RAM is one shared file",
        ),
        (
            [
                "start",
                "g",
                "--memory",
                "512MiB",
                "--cpus",
                "2",
                "--min-cpus",
                "3",
                "--kernel",
                "/k",
            ],
            "--min-cpus 3 and --max-cpus 2 must satisfy",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    code = main(["vm", "--state-dir", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("balloonist: error: ")
    assert expected in err
    assert not (tmp_path / "vms").exists() or not any((tmp_path / "vms").iterdir())


def test_demo_vm_refuses_a_bad_duration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo-vm", "--duration", "5"]) == 2
    assert "--duration" in capsys.readouterr().err


def test_demo_vm_plot_is_written(tmp_path: Path) -> None:
    from balloonist.vmdemo import _plot, _Trace

    trace = _Trace(
        time_s=[0.0, 1.0, 2.0],
        actual={"busy": [384.0, 300.0, 320.0], "quiet": [384.0, 200.0, 180.0]},
        rate={"busy": [0.0, 1e7, 2e7], "quiet": [0.0, 3e7, 3e7]},
    )
    path = _plot(trace, tmp_path / "demo-vm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("flag", "reporting"), [([], True), (["--no-free-page-reporting"], False)])
def test_free_page_reporting_is_on_unless_the_flag_turns_it_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: list[str], reporting: bool
) -> None:
    started: list[launcher.StartRequest] = []

    def start_vm(state: launcher.StateDir, request: launcher.StartRequest) -> launcher.VMRecord:
        started.append(request)
        raise ConfigError("stop here")  # what happens after is not this test's

    monkeypatch.setattr(launcher, "start_vm", start_vm)
    args = ["start", "g", "--memory", "512MiB", "--kernel", str(tmp_path), *flag]
    assert main(["vm", "--state-dir", str(tmp_path), *args]) == 2
    assert [r.free_page_reporting for r in started] == [reporting]
