"""``balloonist suite``: bad input is one line and exit 2; a tiny run writes its report."""

from __future__ import annotations

import io
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from balloonist import cli
from balloonist.sim.scenario import load_scenario
from balloonist.suite import command, executors
from tests.suite.tiny import TINY


def run(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stderr", err)
    code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--count", "0"], "balloonist: error: --count: must be between 1 and"),
        (["--policies", "nope"], "balloonist: error: --policies: unknown policy 'nope'"),
        (["--policies", "static,static"], "balloonist: error: --policies: a policy is named twice"),
        (["--jobs", "0"], "balloonist: error: --jobs: must be at least 1"),
        (["--seed", "-1"], "balloonist: error: --seed: must be between 0"),
    ],
)
def test_bad_input(args: list[str], message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run(["suite", *args], monkeypatch)
    assert code == 2
    assert err.startswith(message) and err.count("\n") == 1
    assert out == ""


def test_non_empty_report_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "old.txt").write_text("x")
    code, _, err = run(["suite", "--report", str(tmp_path)], monkeypatch)
    assert code == 2
    assert err.startswith(f"balloonist: error: report {tmp_path}: directory exists and is not")
    assert err.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["old.txt"]


def test_ray_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executors, "ray_available", lambda: False)
    code, _, err = run(["suite", "--ray"], monkeypatch)
    assert code == 2
    assert err == (
        "balloonist: error: --ray needs the ray package: pip install 'balloonist[ray]'\n"
    )


def test_interrupted_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("balloonist.suite.runner.run_suite", interrupted)
    monkeypatch.setattr(command, "DEFAULT_PARAMS", TINY)
    report = tmp_path / "report"
    code, _, err = run(["suite", "--count", "1", "--report", str(report)], monkeypatch)
    assert code == 130 and err == "balloonist: error: interrupted\n"
    assert list(tmp_path.iterdir()) == []


def test_tiny_run_with_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(command, "DEFAULT_PARAMS", TINY)
    report = tmp_path / "report"
    argv = ["suite", "--count", "3", "--seed", "2", "--policies", "static,oracle"]
    code, out, err = run([*argv, "--jobs", "1", "--report", str(report)], monkeypatch)
    assert (code, err) == (0, "")
    assert "3/6 runs done" in out and "6/6 runs done" in out
    assert "median" in out and "static" in out and "oracle" in out
    assert out.endswith(f"report written to {report}\n")

    assert sorted(p.name for p in report.iterdir()) == sorted(command_files())
    written = json.loads((report / "records.json").read_text())
    records = written["records"]
    # its times, so that bench_suite.py --add-records takes it as a slice
    assert written["wall_s"] > 0
    assert written["cpu_s"] == pytest.approx(sum(r["cpu_s"] for r in records))
    assert [(r["scenario"], r["policy"]) for r in records] == [
        (f"suite-2-{i}", p) for i in range(3) for p in ("static", "oracle")
    ]
    summary = json.loads((report / "summary.json").read_text())
    assert summary["policies"]["oracle"]["relative"]["oracle"]["median"] == 1.0
    assert summary["seed"] == 2 and summary["count"] == 3
    tomls = sorted((report / "scenarios").iterdir())
    assert [p.name for p in tomls] == [f"suite-2-{i}.toml" for i in range(3)]
    for path in tomls:
        tomllib.loads(path.read_text())
        assert load_scenario(path).name == path.stem
    assert (report / "suite.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def command_files() -> tuple[str, ...]:
    from balloonist.suite.report import SUITE_FILES

    return SUITE_FILES
