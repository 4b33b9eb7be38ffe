"""The server for real: uvicorn on an owner-only unix socket and on loopback TCP with a
token, event streams over it, stale sockets, clean stops, the token file."""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from balloonist.api import (
    ApiServer,
    parse_tcp_address,
    read_or_create_token,
    read_token,
    serve,
)
from balloonist.errors import ConfigError
from tests.api.fake import FakeController, make_status

TOKEN = "s3cret-token-0123456789abcdef"
#: Generous bound on the wait for an event or a stop on a shared 2-core machine; the
#: server itself polls every 0.1 s.
DEADLINE_S = 5.0


def uds_client(path: Path, timeout_s: float = DEADLINE_S) -> httpx.Client:
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(path)), base_url="http://api", timeout=timeout_s
    )


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "api.sock"


@pytest.fixture
def fake() -> FakeController:
    return FakeController(make_status())


@pytest.fixture
def server(fake: FakeController, sock_path: Path) -> Iterator[ApiServer]:
    old_umask = os.umask(0)  # the worst umask: the mode must not come from it
    try:
        running = serve(fake, unix_socket=sock_path)
    finally:
        os.umask(old_umask)
    yield running
    running.stop()


def test_unix_socket_is_owner_only_and_serves(server: ApiServer, sock_path: Path) -> None:
    info = sock_path.lstat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    with uds_client(sock_path) as client:
        response = client.get("/v1/host")
    assert response.status_code == 200
    assert response.json()["state"] == "soft"


def test_stop_removes_the_socket_and_is_idempotent(server: ApiServer, sock_path: Path) -> None:
    server.stop()
    assert not sock_path.exists()
    server.stop()


def read_event(lines: Iterator[str]) -> dict[str, str]:
    """The next event's fields (comments and retry lines skipped)."""
    event: dict[str, str] = {}
    for line in lines:
        if line == "":
            if "data" in event:
                return event
            event = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(": ")
            event[key] = value
    raise AssertionError("stream ended")


def test_events_stream_a_status_per_new_version(
    server: ApiServer, fake: FakeController, sock_path: Path
) -> None:
    with uds_client(sock_path) as client, client.stream("GET", "/v1/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        first = read_event(lines)
        assert (first["event"], first["id"]) == ("status", "1")
        started = time.monotonic()
        fake.publish(make_status(2))
        second = read_event(lines)  # the client's read timeout is the deadline
        assert (second["event"], second["id"]) == ("status", "2")
        assert '"version":2' in second["data"]
        assert time.monotonic() - started < DEADLINE_S
        # Stopping the server ends the open stream instead of waiting on it.
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < DEADLINE_S


def test_events_wait_for_the_first_status(sock_path: Path) -> None:
    fake = FakeController(None)
    with (
        serve(fake, unix_socket=sock_path),
        uds_client(sock_path) as client,
        client.stream("GET", "/v1/events") as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        fake.publish(make_status(5))
        assert read_event(lines)["id"] == "5"


def test_client_going_away_leaves_the_server_serving(server: ApiServer, sock_path: Path) -> None:
    with uds_client(sock_path) as client:
        for _ in range(3):
            with client.stream("GET", "/v1/events") as response:
                read_event(response.iter_lines())
        assert client.get("/v1/status").status_code == 200
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < DEADLINE_S


def test_stale_socket_file_is_replaced(fake: FakeController, sock_path: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))
    dead.close()  # the file stays, nobody listens: what a killed daemon leaves
    with serve(fake, unix_socket=sock_path), uds_client(sock_path) as client:
        assert client.get("/v1/policy").status_code == 200


def test_socket_in_use_is_refused(server: ApiServer, fake: FakeController, sock_path: Path) -> None:
    with pytest.raises(ConfigError, match="another server is listening"):
        serve(fake, unix_socket=sock_path)
    with uds_client(sock_path) as client:  # the first one is untouched
        assert client.get("/v1/host").status_code == 200


def test_other_file_in_the_way_is_left_alone(fake: FakeController, sock_path: Path) -> None:
    sock_path.write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        serve(fake, unix_socket=sock_path)
    assert sock_path.read_text() == "precious"


def test_tcp_needs_a_token(fake: FakeController) -> None:
    with pytest.raises(ConfigError, match="needs a bearer token"):
        serve(fake, tcp=("127.0.0.1", 0))


def test_nothing_to_listen_on(fake: FakeController) -> None:
    with pytest.raises(ConfigError):
        serve(fake)


def test_tcp_with_token_beside_the_socket(fake: FakeController, sock_path: Path) -> None:
    with serve(fake, unix_socket=sock_path, tcp=("127.0.0.1", 0), token=TOKEN) as server:
        assert server.tcp_address is not None
        host, port = server.tcp_address
        base = f"http://{host}:{port}"
        with httpx.Client(base_url=base, timeout=DEADLINE_S) as tcp:
            assert tcp.get("/v1/guests").status_code == 401
            wrong = {"Authorization": "Bearer wrong-token-0123456789abcdef"}
            assert tcp.get("/v1/guests", headers=wrong).status_code == 401
            assert tcp.get("/metrics").status_code == 401
            right = {"Authorization": f"Bearer {TOKEN}"}
            assert tcp.get("/v1/guests", headers=right).status_code == 200
            assert tcp.get("/metrics", headers=right).status_code == 200
        # The socket's mode is its access control: no token there.
        with uds_client(sock_path) as client:
            assert client.get("/v1/guests").status_code == 200
    assert not sock_path.exists()


def test_busy_tcp_port_is_a_config_error(fake: FakeController) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve(fake, tcp=("127.0.0.1", port), token=TOKEN)


# --- the token file -----------------------------------------------------------------------


def token_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "token"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_read_token_strips_the_newline(tmp_path: Path) -> None:
    assert read_token(token_file(tmp_path, TOKEN + "\n")) == TOKEN
    assert read_token(token_file(tmp_path, TOKEN, 0o400)) == TOKEN


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_token_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    with pytest.raises(ConfigError, match="lets other users read") as caught:
        read_token(token_file(tmp_path, TOKEN, mode))
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "shorter than"), ("abc\n", "shorter than"), ("two words here 0123456789", "ASCII")],
)
def test_unusable_token_file_is_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        read_token(token_file(tmp_path, text))
    assert str(tmp_path / "token") in str(caught.value)


def test_missing_token_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        read_token(tmp_path / "nope")


def test_a_missing_token_file_is_made_owner_only_with_a_fresh_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "token"
    old_umask = os.umask(0)  # the worst umask: the mode must not come from it
    try:
        with caplog.at_level(logging.INFO):
            token = read_or_create_token(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == token + "\n" and len(token) >= 32
    assert read_token(path) == token == read_or_create_token(path)  # kept, not replaced
    assert read_or_create_token(tmp_path / "other") != token
    assert f"created a new API token in {path}" in caplog.text
    assert token not in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "token"]  # no temporaries


def test_an_existing_token_file_is_never_rewritten(tmp_path: Path) -> None:
    path = token_file(tmp_path, TOKEN, 0o644)
    with pytest.raises(ConfigError, match="lets other users read"):
        read_or_create_token(path)
    assert path.read_text() == TOKEN


def test_a_token_file_that_cannot_be_made_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot create"):
        read_or_create_token(tmp_path / "no-such-dir" / "token")


def test_token_file_must_be_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        read_token(tmp_path)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("8080", ("127.0.0.1", 8080)),
        ("0.0.0.0:8080", ("0.0.0.0", 8080)),
        ("[::1]:9000", ("::1", 9000)),
        (":9000", ("127.0.0.1", 9000)),
    ],
)
def test_parse_tcp_address(text: str, address: tuple[str, int]) -> None:
    assert parse_tcp_address(text) == address


@pytest.mark.parametrize("text", ["", "host:", "host:http", "70000"])
def test_bad_tcp_address(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_tcp_address(text)


def test_socket_path_too_long_is_a_config_error(fake: FakeController, tmp_path: Path) -> None:
    path = tmp_path / ("x" * 120)
    with pytest.raises(ConfigError, match="cannot listen"):
        serve(fake, unix_socket=path)
