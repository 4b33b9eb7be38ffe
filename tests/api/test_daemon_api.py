"""The daemon over the simulated host with its API, end to end, as a user runs it:
``balloonist daemon --sim`` in a subprocess, asked and steered over its unix socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.waiting import wait_until

#: The subprocess imports numpy, numba and FastAPI and compiles nothing new (the sim's
#: kernels are cached by earlier tests or by the first period); a loaded 2-core CI host
#: has taken up to about 10 s for that. 60 s leaves room without hiding a hang.
DEADLINE_S = 60.0


def test_the_sim_daemon_serves_its_api_and_applies_a_change(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    log_path = tmp_path / "daemon.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "balloonist", "daemon", "--sim", "--speed", "20",
             "--state-dir", str(tmp_path / "state"), "--api-socket", str(sock)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    client = httpx.Client(
        transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://api", timeout=5.0
    )
    try:

        def answers() -> bool:
            try:
                return client.get("/v1/guests").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(answers, DEADLINE_S, "the API answers with a status")
        assert os.stat(sock).st_mode & 0o777 == 0o600
        guests = {g["name"]: g for g in client.get("/v1/guests").json()["guests"]}
        assert set(guests) == {"busy", "idle", "phased"}
        # a bad change: 422, nothing changes
        bad = client.patch("/v1/guests/idle", json={"min": "1GiB", "max": "512MiB"})
        assert bad.status_code == 422
        assert client.patch("/v1/guests/idle", json={"shares": 3000}).status_code == 202
        wait_until(
            lambda: client.get("/v1/guests/idle").json()["shares"] == 3000,
            DEADLINE_S,
            "the change to take effect at a next period",
        )
        metrics = client.get("/metrics").text
        assert 'balloonist_guest_shares{guest="idle"} 3000.0' in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE_S) == 0, log_path.read_text()
        assert not sock.exists()
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--api-tcp", "8080"], "--api-token-file: TCP clients must present a token"),
        (["--no-api", "--api-socket", "x.sock"], "--api-socket: makes no sense with --no-api"),
    ],
)
def test_bad_api_options_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    from balloonist import cli

    assert cli.main(["daemon", "--sim", "--state-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_token_file_that_is_not_there_is_made_for_the_daemon(tmp_path: Path) -> None:
    from balloonist import cli
    from balloonist.daemoncli import daemon_request

    args = cli._parser().parse_args(
        ["daemon", "--sim", "--api-tcp", "0", "--api-token-file", str(tmp_path / "token")]
    )
    request = daemon_request(args)
    assert request.api_tcp == ("127.0.0.1", 0)
    assert request.api_token is not None
    assert (tmp_path / "token").read_text().strip() == request.api_token
    assert (tmp_path / "token").stat().st_mode & 0o777 == 0o600
