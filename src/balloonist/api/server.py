"""Serving the API from inside the daemon: uvicorn in a background thread, on a unix
socket that only its owner may use, and, opt-in, on TCP with a bearer token.

    server = serve(controller, unix_socket=state_dir / "api.sock")
    try:
        ...  # the daemon's loop
    finally:
        server.stop()

- The unix socket is created here, chmod 0600 *before* it listens, so no other user
  can ever connect; a stale socket file left by a dead daemon is replaced, a live one
  (another daemon answering) or any other kind of file is a ConfigError. The file is
  removed on stop. The socket needs no token: the file mode is the access control.
- TCP (``tcp=(host, port)``, host defaults to loopback in :func:`parse_tcp_address`)
  requires a token; without one it is a ConfigError. It is served by its own app
  instance, so the token guards TCP without getting in the way of the socket.
- uvicorn's access log is off (one line per request is noise in a daemon's log, and
  nothing of ours logs headers); the server logs one line per listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import os
import secrets
import socket
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

import uvicorn
from fastapi import FastAPI

from balloonist.api.app import check_token, create_app
from balloonist.daemon.control import Controller
from balloonist.errors import ConfigError

log = logging.getLogger("balloonist.api")

DEFAULT_TCP_HOST: Final = "127.0.0.1"
#: A token file larger than this is not a token file.
MAX_TOKEN_FILE_BYTES: Final = 4096
#: Random bytes in a token the daemon makes itself (43 characters once encoded).
TOKEN_BYTES: Final = 32
#: Waiting this long for uvicorn to start listening means something is wrong.
START_TIMEOUT_S: Final = 10.0
#: Requests still running after this long when stopping are cancelled.
GRACEFUL_SHUTDOWN_S: Final = 2


def read_token(path: Path) -> str:
    """The bearer token in ``path`` (``--api-token-file``), surrounding whitespace
    stripped. The file must be readable by its owner only (no group or other
    permission bits), like an ssh key; otherwise, or if it is not a plain file or the
    token is unusable, ConfigError. The token is never part of an error message."""
    where = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError("no such file", where=where) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", where=where) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError("is not a regular file", where=where)
        if info.st_mode & 0o077:
            raise ConfigError(
                f"mode {stat.S_IMODE(info.st_mode):04o} lets other users read the token "
                f"(chmod 600 {path})",
                where=where,
            )
        data = os.read(fd, MAX_TOKEN_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise ConfigError(f"larger than {MAX_TOKEN_FILE_BYTES} bytes: not a token", where=where)
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError("the token must be printable ASCII", where=where) from None
    try:
        return check_token(token)
    except ConfigError as exc:
        raise ConfigError(exc.message, where=where) from None


def read_or_create_token(path: Path) -> str:
    """:func:`read_token`, but a file that does not exist yet is first created with a
    new random token, mode 0600 from the start, whole or not at all (written aside,
    then linked into place, which never replaces a file that appeared meanwhile).
    Logs that it did, and where; never the token."""
    if not path.exists():
        token = secrets.token_urlsafe(TOKEN_BYTES)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        except OSError as exc:
            raise ConfigError(f"cannot create: {exc.strerror or exc}", where=str(path)) from None
        try:
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(token + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, path)
            log.info("created a new API token in %s (mode 0600)", path)
        except FileExistsError:
            pass  # another process made it first: read theirs
        except OSError as exc:
            raise ConfigError(f"cannot create: {exc.strerror or exc}", where=str(path)) from None
        finally:
            os.unlink(tmp)
    return read_token(path)


def parse_tcp_address(text: str) -> tuple[str, int]:
    """``"8080"`` -> loopback:8080; ``"0.0.0.0:8080"``; ``"[::1]:8080"``."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host = DEFAULT_TCP_HOST
    host = host.removeprefix("[").removesuffix("]") or DEFAULT_TCP_HOST
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{text!r} is not [HOST:]PORT") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range")
    return host, port


class _RunState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


@dataclass(frozen=True)
class _UnixSocketFile:
    """The socket file we made; removed on stop only if it is still ours."""

    path: Path
    device: int
    inode: int

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            info = self.path.lstat()
            if (info.st_dev, info.st_ino) == (self.device, self.inode):
                self.path.unlink()


def bind_unix_socket(path: Path) -> tuple[socket.socket, _UnixSocketFile]:
    """A listening unix socket at ``path`` with mode 0600, set before it listens."""
    where = str(path)
    _clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Until listen() a connect is refused, so the umask's mode never lets anyone in.
        os.chmod(path, 0o600)
        info = path.lstat()
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen: {exc.strerror or exc}", where=where) from None
    return sock, _UnixSocketFile(path, info.st_dev, info.st_ino)


def _clear_stale_socket(path: Path) -> None:
    where = str(path)
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigError("exists and is not a socket; refusing to replace it", where=where)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # left by a daemon that died
        return
    except OSError as exc:
        raise ConfigError(
            f"cannot probe the existing socket: {exc.strerror}", where=where
        ) from None
    finally:
        probe.close()
    raise ConfigError("another server is listening on this socket", where=where)


def bind_tcp(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name: IPv4, as uvicorn does
    try:
        sock = socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def _url_host(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class ApiServer:
    """The API on its listeners, served by uvicorn in one background thread.

    ``start()`` binds (raising ConfigError on a bad address, a busy port or socket)
    and returns once uvicorn listens; ``stop()`` ends event streams, stops uvicorn,
    and removes the socket file. Also a context manager. Not restartable."""

    def __init__(
        self,
        controller: Controller,
        *,
        unix_socket: Path | None = None,
        tcp: tuple[str, int] | None = None,
        token: str | None = None,
    ) -> None:
        if unix_socket is None and tcp is None:
            raise ConfigError("the API needs a unix socket or a TCP address to listen on")
        if tcp is not None and token is None:
            raise ConfigError("the API on TCP needs a bearer token (--api-token-file)")
        if token is not None:
            check_token(token)
        self._controller = controller
        self._unix_path = unix_socket
        self._tcp = tcp
        self._token = token
        self._state = _RunState.NEW
        self._shutdown = threading.Event()
        self._servers: list[uvicorn.Server] = []
        self._thread: threading.Thread | None = None
        self._socket_file: _UnixSocketFile | None = None
        self._tcp_address: tuple[str, int] | None = None
        self._error: BaseException | None = None

    @property
    def unix_socket(self) -> Path | None:
        return self._unix_path

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """Host and port actually bound (the port is chosen by the kernel for port 0)."""
        return self._tcp_address

    def start(self) -> None:
        if self._state is not _RunState.NEW:
            raise RuntimeError(f"ApiServer.start() on a server that is {self._state.value}")
        listeners: list[tuple[uvicorn.Server, socket.socket]] = []
        try:
            if self._unix_path is not None:
                sock, self._socket_file = bind_unix_socket(self._unix_path)
                # The socket's mode is its access control: no token there.
                app = create_app(self._controller, token=None, shutdown=self._shutdown)
                listeners.append((self._uvicorn(app), sock))
            if self._tcp is not None:
                host, port = self._tcp
                sock = bind_tcp(host, port)
                self._tcp_address = (host, int(sock.getsockname()[1]))
                app = create_app(self._controller, token=self._token, shutdown=self._shutdown)
                listeners.append((self._uvicorn(app), sock))
        except BaseException:
            for _, sock in listeners:
                sock.close()
            if self._socket_file is not None:
                self._socket_file.remove()
            self._state = _RunState.STOPPED
            raise
        self._servers = [server for server, _ in listeners]
        self._thread = threading.Thread(
            target=self._run, args=(listeners,), name="balloonist-api", daemon=True
        )
        self._state = _RunState.RUNNING
        self._thread.start()
        self._wait_started()
        if self._socket_file is not None:
            log.info("API listening on unix socket %s (mode 0600)", self._socket_file.path)
        if self._tcp_address is not None:
            host, port = self._tcp_address
            log.info("API listening on tcp %s:%d (bearer token required)", host, port)
            log.info("dashboard: http://%s/dashboard/", _url_host(host, port))
            if not _is_loopback(host):
                log.warning("API on %s is reachable from other machines", host)

    def _uvicorn(self, app: FastAPI) -> uvicorn.Server:
        config = uvicorn.Config(
            app,
            log_config=None,  # leave the daemon's logging alone
            # uvicorn's start and stop lines repeat ours; its warnings still show.
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        return uvicorn.Server(config)

    def _run(self, listeners: list[tuple[uvicorn.Server, socket.socket]]) -> None:
        async def main() -> None:
            await asyncio.gather(*(server.serve(sockets=[sock]) for server, sock in listeners))

        try:
            asyncio.run(main())
        except BaseException as exc:  # uvicorn may sys.exit() on a failed start
            self._error = exc
            log.error("API server failed: %s", exc)

    def _wait_started(self) -> None:
        assert self._thread is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if all(server.started for server in self._servers):
                return
            if not self._thread.is_alive():
                break
            time.sleep(0.01)
        error = self._error
        self.stop()
        raise ConfigError(f"the API server did not start: {error or 'timed out'}")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving; idempotent. Open event streams end, running requests get
        ``GRACEFUL_SHUTDOWN_S`` to finish."""
        if self._state is not _RunState.RUNNING:
            self._state = _RunState.STOPPED
            return
        self._state = _RunState.STOPPED
        self._shutdown.set()
        for server in self._servers:
            server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("API server thread did not stop within %.0f s", timeout_s)
        if self._socket_file is not None:
            self._socket_file.remove()

    def __enter__(self) -> ApiServer:
        if self._state is _RunState.NEW:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve(
    controller: Controller,
    *,
    unix_socket: Path | None = None,
    tcp: tuple[str, int] | None = None,
    token: str | None = None,
) -> ApiServer:
    """Start serving the API (see the module docstring) and return the running server;
    call its ``stop()`` when the daemon stops. Raises ConfigError for TCP without a
    token, a short token, or an address or socket that cannot be bound."""
    server = ApiServer(controller, unix_socket=unix_socket, tcp=tcp, token=token)
    server.start()
    return server
