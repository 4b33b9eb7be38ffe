"""``balloonist agent-pyz``: it writes a runnable agent, says where and how big, and
on bad input or a failed build writes nothing (one line; exit 2 for bad input).

What goes into the archive, and that it needs only a 3.9 stdlib, is
``tests/agent/test_pyz.py``'s business; this is the command around ``build_pyz``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from balloonist import cli
from balloonist.agent import pyz


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    code = cli.main(["agent-pyz", *argv])
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


def run_isolated(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # -I: no PYTHONPATH, user site or current directory, so the installed balloonist
    # cannot stand in for what the archive lacks.
    return subprocess.run(
        [sys.executable, "-I", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        check=False,
    )


def test_writes_a_runnable_agent_and_says_where_and_how_big(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "agent.pyz"
    result = run_cli(capsys, "--output", str(out))
    assert result.code == 0, result.err
    assert result.err == ""
    assert re.fullmatch(rf"agent written to {re.escape(str(out))} \(\d+(\.\d)?KiB\)\n", result.out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.pyz"]  # no staging file left
    assert out.stat().st_mode & 0o100  # executable: its shebang runs it with python3
    version = run_isolated(out, "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("balloonist-agent/")


def test_default_output_is_in_the_current_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = run_cli(capsys)
    assert result.code == 0, result.err
    assert result.out.startswith("agent written to balloonist-agent.pyz (")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["balloonist-agent.pyz"]


def test_an_existing_file_is_replaced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "agent.pyz"
    out.write_bytes(b"old")
    assert run_cli(capsys, "--output", str(out)).code == 0
    assert out.read_bytes().startswith(b"#!/usr/bin/env python3\n")


def test_a_directory_that_does_not_exist_is_one_line_exit_2_and_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "missing" / "agent.pyz"
    result = run_cli(capsys, "--output", str(out))
    assert result.code == 2
    assert result.out == ""
    assert result.err == f"balloonist: error: --output {out}: no directory {out.parent}\n"
    assert list(tmp_path.iterdir()) == []  # not even the directory


def test_a_directory_as_output_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(capsys, "--output", str(tmp_path))
    assert result.code == 2
    assert result.err.startswith(f"balloonist: error: --output {tmp_path}: is a directory")
    assert result.err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_a_failed_build_leaves_the_old_file_and_no_staging_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "agent.pyz"
    out.write_bytes(b"old")

    def half_then_full_disk(path: Path) -> Path:
        path.write_bytes(b"PK half an archive")
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(pyz, "build_pyz", half_then_full_disk)
    result = run_cli(capsys, "--output", str(out))
    assert result.code == 1
    assert result.err.endswith(": No space left on device\n")
    assert result.err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.pyz"]
    assert out.read_bytes() == b"old"
