"""``balloonist status``, ``set`` and ``watch`` against the real API server (uvicorn on a
unix socket in tmp_path) over the fake controller of tests/api/fake.py."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from balloonist import apicli, cli
from balloonist.api import ApiServer, serve
from balloonist.api.client import parse_sse
from balloonist.api.models import StatusOut
from balloonist.daemon.control import GuestChange
from balloonist.units import GIB, MIB
from tests.api.fake import FakeController, make_status

#: Bound on the waits of a test on a shared 2-core machine.
DEADLINE_S = 10.0


@pytest.fixture
def fake() -> FakeController:
    return FakeController(make_status())


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "api.sock"


@pytest.fixture
def server(fake: FakeController, sock: Path) -> Iterator[ApiServer]:
    running = serve(fake, unix_socket=sock)
    yield running
    running.stop()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("balloonist: error: ")
    return lines[0]


def test_status_lists_host_and_every_guest(
    server: ApiServer, sock: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "status", "--api-socket", str(sock))
    assert (code, err) == (0, "")
    assert "host soft: memory 6GiB, free 3GiB" in out and "8 processors shared" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[3:]}
    assert set(rows) == {"web", "db"}
    # name memory min max shares working-set target allocated balloon cooperative, then
    # the processors: vCPUs online, CPU target, CPU demand, CPU shares
    assert " ".join(rows["web"]) == (
        "web 2GiB 256MiB 2GiB 1000 700MiB 1.5GiB 1GiB 1GiB yes 2/4 3 2.5 1000"
    )
    assert rows["db"][4] == "2000" and rows["db"][9] == "NO"
    assert rows["db"][10:] == ["-", "-", "-", "-"]  # its processors are not shared
    assert "\x1b" not in out  # no colour without a terminal


def test_state_dir_means_its_api_sock(
    server: ApiServer, sock: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "status", "--state-dir", str(sock.parent))
    assert code == 0 and "web" in out


def test_status_json(server: ApiServer, sock: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "status", "--api-socket", str(sock), "--json")
    assert (code, err) == (0, "")
    body = json.loads(out)
    assert [g["name"] for g in body["guests"]] == ["web", "db"]
    assert body["host"]["memory_bytes"] == 6 * GIB
    StatusOut.model_validate(body)


def test_rich_table_has_every_guest(fake: FakeController) -> None:
    status = fake.status()
    assert status is not None
    buffer = io.StringIO()
    Console(file=buffer, width=160, force_terminal=False).print(
        apicli.render_status(StatusOut.of(status))
    )
    text = buffer.getvalue()
    for needle in ("web", "db", "working set", "cooperative", "700MiB", "host soft"):
        assert needle in text


def test_set_sends_the_change(
    server: ApiServer, sock: Path, fake: FakeController, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys, "set", "web", "--min", "512MiB", "--shares", "3000", "--api-socket", str(sock)
    )
    assert (code, err) == (0, "")
    assert out == "web: min 512MiB, shares 3000 accepted; applies at the next period\n"
    assert len(fake.guest_changes) == 1
    name, change = fake.guest_changes[0]
    assert (name, change.min_bytes, change.max_bytes, change.shares) == (
        "web",
        512 * MIB,
        None,
        3000,
    )


def test_set_sends_a_change_of_processors(
    server: ApiServer, sock: Path, fake: FakeController, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys, "set", "web", "--cpu-shares", "3000", "--max-cpus", "3", "--api-socket", str(sock)
    )
    assert (code, err) == (0, "")
    assert out == "web: max_cpus 3, cpu_shares 3000 accepted; applies at the next period\n"
    assert fake.guest_changes == [("web", GuestChange(max_cpus=3, cpu_shares=3000))]
    code, out, err = run(capsys, "set", "db", "--min-cpus", "2", "--api-socket", str(sock))
    assert code == 2 and "processors are not shared" in one_error_line(err)


def test_set_takes_the_former_processor_flags(
    server: ApiServer, sock: Path, fake: FakeController, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "set", "web", "--cpu-max", "3", "--api-socket", str(sock))
    assert (code, err) == (0, "") and out.startswith("web: max_cpus 3 accepted")
    assert fake.guest_changes == [("web", GuestChange(max_cpus=3))]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max", "2"], "--max: size '2' has no unit"),
        (["--min", "lots"], "--min: 'lots' is not a size"),
        (["--shares", "0"], "--shares: must be 1 or more"),
        (["--min-cpus", "0"], "--min-cpus: must be 1 or more"),
        ([], "nothing to change"),
    ],
)
def test_set_checks_locally_and_sends_nothing(
    server: ApiServer,
    sock: Path,
    fake: FakeController,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    code, out, err = run(capsys, "set", "web", *args, "--api-socket", str(sock))
    assert code == 2 and out == ""
    assert message in one_error_line(err)
    assert fake.guest_changes == []


def test_set_min_above_max_is_the_servers_422(
    server: ApiServer, sock: Path, fake: FakeController, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys, "set", "web", "--min", "1GiB", "--max", "512MiB", "--api-socket", str(sock)
    )
    assert code == 2 and out == ""
    assert one_error_line(err) == ("balloonist: error: guest 'web': min 1GiB is above max 512MiB")
    assert fake.guest_changes == []


def test_set_unknown_guest(
    server: ApiServer, sock: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "set", "nope", "--shares", "5", "--api-socket", str(sock))
    assert code == 2 and out == ""
    assert one_error_line(err) == "balloonist: error: no guest named 'nope'"


def test_not_ready_is_exit_1(
    fake: FakeController, sock: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.publish(None)
    with serve(fake, unix_socket=sock):
        code, _, err = run(capsys, "status", "--api-socket", str(sock))
    assert code == 1
    assert "no status yet" in one_error_line(err)


@pytest.mark.parametrize("command", [["status"], ["set", "web", "--shares", "2"], ["watch"]])
def test_no_daemon_is_one_line_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    missing = tmp_path / "api.sock"
    code, out, err = run(capsys, *command, "--api-socket", str(missing))
    assert code == 1 and out == ""
    assert one_error_line(err) == (
        f"balloonist: error: no daemon answers on {missing} (is `balloonist daemon` running?)"
    )


def test_token_file_needs_api_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "status", "--api-token-file", str(tmp_path / "t"))
    assert code == 2
    assert "--api-token-file: is for --api-url" in one_error_line(err)


def test_wrong_token_over_tcp(
    fake: FakeController, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("wrong-token-0123456789abcdef\n")
    token_file.chmod(0o600)
    with serve(fake, tcp=("127.0.0.1", 0), token="right-token-0123456789abcdef") as api:
        assert api.tcp_address is not None
        url = f"http://127.0.0.1:{api.tcp_address[1]}"
        code, _, err = run(capsys, "status", "--api-url", url, "--api-token-file", str(token_file))
        assert code == 2
        assert "missing or wrong bearer token" in one_error_line(err)
        token_file.write_text("right-token-0123456789abcdef\n")
        code, out, _ = run(
            capsys, "status", "--api-url", url, "--api-token-file", str(token_file), "--json"
        )
        assert code == 0 and json.loads(out)["version"] == 1


def test_watch_prints_one_line_per_period(
    server: ApiServer, sock: Path, fake: FakeController, capsys: pytest.CaptureFixture[str]
) -> None:
    # The daemon's periods: advance until the watch is done (it stops after two), so
    # the second update comes whether the watch connected before or after the first.
    done = threading.Event()

    def periods() -> None:
        while not done.wait(0.2):
            fake.advance()

    ticker = threading.Thread(target=periods, daemon=True)
    ticker.start()
    result: list[int] = []
    watcher = threading.Thread(
        target=lambda: result.append(
            cli.main(["watch", "--count", "2", "--api-socket", str(sock)])
        ),
        daemon=True,
    )
    watcher.start()
    watcher.join(DEADLINE_S)
    done.set()
    ticker.join(DEADLINE_S)
    assert not watcher.is_alive(), "watch did not stop after two updates"
    assert result == [0]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    versions = [int(line.split()[1]) for line in lines]
    assert versions[0] < versions[1]
    for line in lines:
        assert line.startswith("period ") and "| web alloc=1GiB" in line and "| db " in line


def test_parse_sse() -> None:
    lines = [
        "retry: 1000",
        "",
        ": keep-alive",
        "",
        "event: status",
        "id: 3",
        'data: {"a":',
        "data: 1}",
        "",
        "data: plain",
        "",
    ]
    assert list(parse_sse(iter(lines))) == [("status", '{"a":\n1}'), ("message", "plain")]


def test_help_names_the_default_socket(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "status", "--help")
    assert code == 0
    assert str(apicli.default_socket()) in " ".join(out.split())
