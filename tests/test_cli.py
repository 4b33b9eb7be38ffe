"""The command line: exit codes, one-line errors, output shapes; and the docs' examples.

The simulator is replaced by ``FakeRunner`` through ``main``'s ``runner`` seam, so these
tests prove what the CLI does with input and results, not what the engine computes.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel
from rich.console import Console

from balloonist import cli, report
from balloonist.errors import SimulationError
from balloonist.live import LiveView, ProgressLines, format_rate, render_progress
from balloonist.model import HostState
from balloonist.policy import DEFAULT_POLICY
from balloonist.sim.result import (
    HOST_STATE_CODES,
    GuestProgress,
    GuestSeries,
    Progress,
    SimResult,
)
from balloonist.sim.scenario import (
    Scenario,
    load_scenario,
    load_scenario_or_demo,
    scenario_from_dict,
)
from balloonist.units import MIB

DOCS = Path(__file__).resolve().parents[1] / "docs"
DEMO_TOML = Path(__file__).resolve().parents[1] / "src" / "balloonist" / "scenarios" / "demo.toml"

VALID = """\
[host]
memory = "1GiB"

[sim]
duration_s = 20.0
period_s = 1.0

[[guests]]
name = "web"
memory = "512MiB"
min = "64MiB"
workload = { kind = "uniform", working_set = "100MiB" }

[[guests]]
name = "db"
memory = "512MiB"
workload = { kind = "zipf", working_set = "300MiB", skew = 0.9 }
"""
VALID_PERIODS = 20
VALID_GUESTS = 2


@dataclass
class FakeRunner:
    """Stands in for ``run_scenario``: reports every period, returns made-up series."""

    fail_with: Exception | None = None
    calls: list[tuple[str, str | None]] = field(default_factory=list)
    #: Policy name -> factor on every guest's references, so policies can differ.
    refs_scale: dict[str, float] = field(default_factory=dict)
    #: Fail only the run of this policy (with ``fail_with``).
    fail_for: str | None = None

    def __call__(
        self,
        scenario: Scenario,
        *,
        policy_name: str | None = None,
        progress: Callable[[Progress], None] | None = None,
    ) -> SimResult:
        self.calls.append((scenario.name, policy_name))
        if self.fail_with is not None and self.fail_for in (None, policy_name):
            raise self.fail_with
        scale = self.refs_scale.get(policy_name or scenario.policy_name, 1.0)
        n = scenario.periods
        ramp = np.linspace(0.2, 0.8, n)
        guests = tuple(
            GuestSeries(
                name=g.name,
                memory_bytes=g.spec.memory_bytes,
                allocation_bytes=(ramp * g.spec.memory_bytes).astype(np.int64),
                target_bytes=np.full(n, g.spec.memory_bytes // 2, dtype=np.int64),
                balloon_bytes=((1 - ramp) * g.spec.memory_bytes / 4).astype(np.int64),
                balloon_target_bytes=np.full(n, g.spec.memory_bytes // 4, dtype=np.int64),
                working_set_bytes=np.full(n, 100 * MIB, dtype=np.int64),
                refs=np.full(n, round(1000 * (i + 1) * scale), dtype=np.int64),
                major_faults=np.ones(n, dtype=np.int64),
                guest_swap_outs=np.zeros(n, dtype=np.int64),
                host_swap_ins=np.zeros(n, dtype=np.int64),
                host_swap_outs=np.ones(n, dtype=np.int64),
                double_paging=np.zeros(n, dtype=np.int64),
                balloon_rate_pages=np.full(n, 256, dtype=np.int64),
            )
            for i, g in enumerate(scenario.guests)
        )
        time_s = scenario.period_s * np.arange(1, n + 1, dtype=np.float64)
        states = np.array([i * len(HOST_STATE_CODES) // n for i in range(n)], dtype=np.int64)
        result = SimResult(
            scenario=scenario.name,
            policy=policy_name or scenario.policy_name,
            seed=scenario.seed,
            duration_s=n * scenario.period_s,
            period_s=scenario.period_s,
            host_memory_bytes=scenario.host_memory_bytes,
            time_s=time_s,
            host_free_bytes=np.full(n, 200 * MIB, dtype=np.int64),
            host_swap_used_bytes=np.zeros(n, dtype=np.int64),
            host_state=states,
            guests=guests,
        )
        if progress is not None:
            for k in range(n):
                progress(_progress_at(result, k))
        return result


def _progress_at(result: SimResult, k: int) -> Progress:
    return Progress(
        period=k + 1,
        periods=len(result.time_s),
        time_s=float(result.time_s[k]),
        host_memory_bytes=result.host_memory_bytes,
        host_free_bytes=int(result.host_free_bytes[k]),
        host_state=HOST_STATE_CODES[int(result.host_state[k])],
        guests=tuple(
            GuestProgress(
                name=g.name,
                memory_bytes=g.memory_bytes,
                allocation_bytes=int(g.allocation_bytes[k]),
                target_bytes=int(g.target_bytes[k]),
                balloon_bytes=int(g.balloon_bytes[k]),
                working_set_bytes=int(g.working_set_bytes[k]),
                refs_per_s=float(g.refs[k]) / result.period_s,
                major_faults=int(g.major_faults[: k + 1].sum()),
            )
            for g in result.guests
        ),
    )


class TtyStringIO(io.StringIO):
    """A captured stream that says it is a terminal, to take the live-view branches."""

    def isatty(self) -> bool:
        return True


@dataclass
class Run:
    code: int
    out: str
    err: str


def run_cli(
    capsys: pytest.CaptureFixture[str], *argv: str, runner: FakeRunner | None = None
) -> Run:
    code = cli.main(list(argv), runner=runner if runner is not None else FakeRunner())
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


def write(tmp_path: Path, text: str, name: str = "scenario.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------
# Bad input: exit 2, one line naming file and key, nothing run, nothing written


BAD_SCENARIOS = {
    "unknown_key": (VALID.replace("[sim]", "[sim]\nspeed = 2"), "sim.speed"),
    "min_above_max": (
        VALID.replace('min = "64MiB"', 'min = "300MiB"\nmax = "200MiB"'),
        "guests[0].min",
    ),
    "reservations_above_host": (
        VALID.replace('min = "64MiB"', 'min = "512MiB"')
        .replace('name = "db"\nmemory = "512MiB"', 'name = "db"\nmemory = "512MiB"\nmin = "512MiB"')
        .replace('memory = "1GiB"', 'memory = "768MiB"'),
        "guests[*].min",
    ),
    "unknown_policy_in_file": (VALID + '\n[policy]\nname = "greedy"\n', "policy.name"),
    "unknown_workload_kind": (VALID.replace('kind = "zipf"', 'kind = "random"'), "workload.kind"),
    "not_toml": ("[host\n", ""),
}


@pytest.mark.parametrize("case", sorted(BAD_SCENARIOS))
def test_bad_scenario_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    text, key = BAD_SCENARIOS[case]
    path = write(tmp_path, text, f"{case}.toml")
    runner = FakeRunner()
    result = run_cli(
        capsys, "simulate", str(path), "--report", str(tmp_path / "out"), runner=runner
    )
    assert result.code == 2
    assert result.out == ""
    assert result.err.count("\n") == 1, result.err
    assert result.err.startswith("balloonist: error: ")
    assert f"{case}.toml" in result.err
    assert key in result.err
    assert "Traceback" not in result.err
    assert runner.calls == []
    assert not (tmp_path / "out").exists()


def test_missing_scenario_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "simulate", str(tmp_path / "nowhere.toml"))
    assert result.code == 2
    assert result.err == f"balloonist: error: {tmp_path / 'nowhere.toml'}: no such file\n"


def test_size_without_unit_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, VALID.replace('working_set = "100MiB"', 'working_set = "100"'))
    result = run_cli(capsys, "simulate", str(path), "--report", str(tmp_path / "out"))
    assert result.code == 2
    assert result.err.count("\n") == 1
    assert "has no unit" in result.err
    assert "scenario.toml" in result.err
    assert not (tmp_path / "out").exists()


def test_size_without_unit_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, VALID.replace('working_set = "100MiB"', 'working_set = "100"'))
    result = run_cli(capsys, "simulate", str(path))
    assert "guests[0].workload.working_set" in result.err


def test_unknown_policy_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runner = FakeRunner()
    result = run_cli(
        capsys,
        "simulate",
        str(write(tmp_path, VALID)),
        "--policy",
        "greedy",
        "--report",
        str(tmp_path / "out"),
        runner=runner,
    )
    assert result.code == 2
    assert result.err.count("\n") == 1
    assert "--policy" in result.err
    assert "'greedy'" in result.err
    assert runner.calls == []
    assert not (tmp_path / "out").exists()


def test_non_empty_report_directory_is_refused_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.csv").write_text("keep me")
    runner = FakeRunner()
    result = run_cli(
        capsys, "simulate", str(write(tmp_path, VALID)), "--report", str(out), runner=runner
    )
    assert result.code == 2
    assert "not empty" in result.err
    assert runner.calls == []
    assert [p.name for p in out.iterdir()] == ["old.csv"]


@pytest.mark.parametrize(
    "argv", [[], ["simulate"], ["simulate", "x.toml", "--bogus"], ["fly"], ["demo", "--pace", "x"]]
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert run_cli(capsys, *argv).code == 2


def test_bad_pace_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "demo", "--pace", "-1")
    assert result.code == 2
    assert result.err.startswith("balloonist: error: --pace: ")


def test_simulator_failure_is_one_line_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runner = FakeRunner(fail_with=SimulationError("guest 'web' maps more pages than it has"))
    result = run_cli(capsys, "simulate", str(write(tmp_path, VALID)), runner=runner)
    assert result.code == 1
    assert result.err == "balloonist: error: guest 'web' maps more pages than it has\n"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "--version")
    assert result.code == 0
    assert re.fullmatch(r"balloonist \S+\n", result.out)


# ---------------------------------------------------------------------------------------
# simulate: --json, --report, progress


def test_json_prints_exactly_the_summary_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, VALID)
    result = run_cli(capsys, "simulate", str(path), "--json")
    assert result.code == 0
    assert result.err == ""  # stderr is not a terminal here, so no progress at all
    assert result.out.count("\n") == 1
    summary = json.loads(result.out)
    expected = FakeRunner()(load_scenario(path)).summary()
    assert summary == json.loads(json.dumps(expected))
    assert set(summary) == {"scenario", "policy", "seed", "duration_s", "aggregate", "guests"}
    assert set(summary["guests"]) == {"web", "db"}


def test_json_progress_goes_to_a_terminal_stderr_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stdout, stderr = io.StringIO(), TtyStringIO()
    monkeypatch.setattr("sys.stdout", stdout)
    monkeypatch.setattr("sys.stderr", stderr)
    code = cli.main(["simulate", str(write(tmp_path, VALID)), "--json"], runner=FakeRunner())
    assert code == 0
    json.loads(stdout.getvalue())
    assert stdout.getvalue().count("\n") == 1
    assert "web" in stderr.getvalue()  # the live view drew frames there


def test_policy_override_reaches_the_runner(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runner = FakeRunner()
    path = write(tmp_path, VALID)
    result = run_cli(capsys, "simulate", str(path), "--policy", "static", "--json", runner=runner)
    assert runner.calls == [("scenario", "static")]
    assert json.loads(result.out)["policy"] == "static"


def test_report_directory_has_every_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    result = run_cli(capsys, "simulate", str(write(tmp_path, VALID)), "--report", str(out))
    assert result.code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(report.REPORT_FILES)
    with (out / "timeseries.csv").open(newline="") as f:
        header, *rows = list(csv.reader(f))
    assert tuple(header) == report.TIMESERIES_COLUMNS
    assert len(rows) == VALID_PERIODS * VALID_GUESTS
    with (out / "host.csv").open(newline="") as f:
        assert len(list(csv.reader(f))) == 1 + VALID_PERIODS
    assert f"report written to {out}" in result.out


def test_json_and_report_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    result = run_cli(
        capsys, "simulate", str(write(tmp_path, VALID)), "--json", "--report", str(out)
    )
    assert json.loads(result.out) == json.loads((out / "summary.json").read_text())


def test_plain_progress_lines_when_not_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(capsys, "simulate", str(write(tmp_path, VALID)))
    assert result.code == 0
    lines = [line for line in result.out.splitlines() if line.startswith("[")]
    # 20 periods, a line every 10 % = every 2 periods.
    assert len(lines) == 10
    assert lines[0].startswith("[ 10%] t=2.0s period 2/20")
    assert lines[-1].startswith("[100%] t=20.0s period 20/20")
    assert "\x1b" not in result.out  # no terminal control codes in a pipe
    assert "throughput" in result.out  # then the summary table


def test_no_live_gives_plain_lines_even_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stdout = TtyStringIO()
    monkeypatch.setattr("sys.stdout", stdout)
    code = cli.main(["simulate", str(write(tmp_path, VALID)), "--no-live"], runner=FakeRunner())
    assert code == 0
    assert sum(line.startswith("[") for line in stdout.getvalue().splitlines()) == 10


# ---------------------------------------------------------------------------------------
# demo


def test_demo_plain_writes_the_plot_and_prints_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runner = FakeRunner()
    out = tmp_path / "demo-out"
    result = run_cli(capsys, "demo", "--no-live", "--out", str(out), runner=runner)
    assert result.code == 0, result.err
    assert runner.calls == [("demo", None)]
    plot = out / "demo.png"
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert f"plot written to {plot}" in result.out
    assert "double paging" in result.out


def test_demo_live_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stdout = TtyStringIO()
    monkeypatch.setattr("sys.stdout", stdout)
    runner = FakeRunner()
    argv = ["demo", "--out", str(tmp_path), "--pace", "0", "--policy", "static"]
    assert cli.main(argv, runner=runner) == 0
    # The live run is made here; the comparison's runs in worker processes.
    assert runner.calls == [("demo", "static")]
    assert "busy" in stdout.getvalue()
    assert "\x1b[" in stdout.getvalue()  # drawn as a live terminal view
    assert "120/120" in stdout.getvalue()  # the comparison's bars, full at the end
    # --policy's run is the baseline; the scenario's default joins the peers.
    assert list(_compare_json(tmp_path)) == ["static", DEFAULT_POLICY, "mom", "proxmox"]
    assert "static (--policy)" in stdout.getvalue()


def _compare_json(out: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    return loaded


def test_demo_compares_the_default_with_its_peers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runner = FakeRunner(refs_scale={"mom": 1.5, "static": 0.5})
    result = run_cli(capsys, "demo", "--no-live", "--out", str(tmp_path), runner=runner)
    assert result.code == 0, result.err
    compared = _compare_json(tmp_path)
    assert list(compared) == [DEFAULT_POLICY, "mom", "proxmox", "static"]  # the default first
    for name, summary in compared.items():
        assert summary["policy"] == name  # each peer ran under its own name
    assert compared["mom"]["aggregate"]["throughput_refs_per_s"] == 9000.0
    assert "[100%] comparing: mom 120/120, proxmox 120/120, static 120/120" in result.out
    rows = {line.split("│")[1].strip(): line for line in result.out.splitlines() if "│" in line}
    assert "1.50x" in rows["mom"]
    assert "0.50x" in rows["static"]
    assert "1.00x" in rows[f"{DEFAULT_POLICY} (default)"]
    assert f"mom won: 1.50x the throughput of {DEFAULT_POLICY} (default)" in result.out
    assert f"comparison written to {tmp_path / 'compare.json'}" in result.out


def test_demo_default_is_the_scenarios_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    demo = dataclasses.replace(load_scenario_or_demo(None), policy_name="proxmox")
    monkeypatch.setattr("balloonist.sim.scenario.load_scenario_or_demo", lambda path: demo)
    runner = FakeRunner(refs_scale={"proxmox": 2.0})
    result = run_cli(capsys, "demo", "--no-live", "--out", str(tmp_path), runner=runner)
    assert result.code == 0, result.err
    assert list(_compare_json(tmp_path)) == ["proxmox", "mom", "static"]
    assert "proxmox (default) won: 2.00x the throughput of mom" in result.out


def test_demo_no_compare_runs_the_default_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(capsys, "demo", "--no-live", "--no-compare", "--out", str(tmp_path))
    assert result.code == 0, result.err
    assert (tmp_path / "demo.png").exists()
    assert not (tmp_path / "compare.json").exists()
    assert "comparing" not in result.out


def test_demo_comparison_failure_is_one_line_and_writes_no_compare_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runner = FakeRunner(fail_with=SimulationError("guest 'busy' maps too much"), fail_for="mom")
    result = run_cli(capsys, "demo", "--no-live", "--out", str(tmp_path), runner=runner)
    assert result.code == 1
    assert result.err == "balloonist: error: guest 'busy' maps too much\n"
    assert not (tmp_path / "compare.json").exists()
    assert list(tmp_path.glob(".compare.json*")) == []


def test_demo_scenario_is_valid_and_overcommitted() -> None:
    scenario = load_scenario(DEMO_TOML)
    assert [g.name for g in scenario.guests] == ["busy", "idle", "phased"]
    configured = sum(g.spec.memory_bytes for g in scenario.guests)
    assert configured > scenario.host_memory_bytes  # the point of the demo
    # long enough to see memory move twice, short enough to watch (0.1 s a period live)
    assert 60 <= scenario.duration_s <= 150
    assert load_scenario_or_demo(None) == scenario  # the packaged copy is the one in the tree


# ---------------------------------------------------------------------------------------
# The views on their own


def _result(periods: int) -> SimResult:
    text = VALID.replace("duration_s = 20.0", f"duration_s = {periods}.0")
    return FakeRunner()(scenario_from_dict(tomllib.loads(text), where="t", default_name="t"))


@pytest.mark.parametrize(
    ("periods", "printed"),
    [
        (20, [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]),
        (7, [1, 2, 3, 4, 5, 6, 7]),
        (25, [3, 6, 9, 12, 15, 18, 21, 24, 25]),
    ],
)
def test_progress_lines_every_tenth_and_at_the_end(periods: int, printed: list[int]) -> None:
    result = _result(periods)
    stream = io.StringIO()
    lines = ProgressLines(stream)
    for k in range(periods):
        lines(_progress_at(result, k))
    got = [int(m) for m in re.findall(r"period (\d+)/", stream.getvalue())]
    assert got == printed


def test_live_view_paces_with_the_injected_clock() -> None:
    result = _result(VALID_PERIODS)
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    console = Console(file=io.StringIO(), force_terminal=True, width=140)
    with LiveView(
        console, title="t", min_period_wall_s=0.25, clock=lambda: now[0], sleep=sleep
    ) as view:
        view(_progress_at(result, 0))
        now[0] += 0.05  # the simulator took 50 ms for this period
        view(_progress_at(result, 1))
        now[0] += 1.0  # and a whole second for this one: no waiting
        view(_progress_at(result, 2))
    assert slept == [pytest.approx(0.2)]


def test_live_frame_shows_every_guest_and_the_host_state() -> None:
    result = _result(VALID_PERIODS)
    buffer = io.StringIO()
    console = Console(file=buffer, width=160, color_system=None)
    console.print(render_progress(_progress_at(result, len(result.time_s) - 1), title="t"))
    text = buffer.getvalue()
    assert "web" in text
    assert "db" in text
    assert HostState.LOW.value.upper() in text


@pytest.mark.parametrize(
    ("per_s", "text"),
    [
        (0.0, "0"),
        (55.25, "55.2"),
        (999.0, "999"),
        (999.9, "1k"),
        (1234.0, "1.23k"),
        (999_999.0, "1M"),
        (2.5e6, "2.5M"),
        (3e12, "3000G"),
    ],
)
def test_format_rate(per_s: float, text: str) -> None:
    assert format_rate(per_s) == text


# ---------------------------------------------------------------------------------------
# Docs examples are executed


def _fenced(path: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), flags=re.M | re.S)


def test_every_toml_example_in_the_scenario_docs_loads() -> None:
    blocks = _fenced(DOCS / "scenarios.md", "toml")
    assert blocks, "docs/scenarios.md should contain ```toml examples"
    for i, block in enumerate(blocks):
        scenario_from_dict(tomllib.loads(block), where=f"scenarios.md block {i}", default_name="x")


def test_cli_docs_json_example_has_the_summary_shape(tmp_path: Path) -> None:
    (block,) = _fenced(DOCS / "cli.md", "json")
    documented = json.loads(block)
    actual = FakeRunner()(load_scenario(write(tmp_path, VALID))).summary()
    assert set(documented) == set(actual)
    assert set(documented["aggregate"]) == set(actual["aggregate"])
    for guest in documented["guests"].values():
        assert set(guest) == set(actual["guests"]["web"])


def test_scenario_docs_name_every_key_of_the_schema() -> None:
    from balloonist.sim import scenario as schema

    text = (DOCS / "scenarios.md").read_text()
    tables: list[type[BaseModel]] = [
        schema.ScenarioFile,
        schema.HostTable,
        schema.SimTable,
        schema.PolicyTable,
        schema.RateTable,
        schema.CostsTable,
        schema.GuestTable,
        schema.WorkloadTable,
        schema.PhaseTable,
        schema.CpuTable,
        schema.CpuWorkloadTable,
    ]
    missing = [
        f"{table.__name__}.{key}"
        for table in tables
        for key in table.model_fields
        if f"| `{key}` |" not in text
    ]
    assert missing == []
