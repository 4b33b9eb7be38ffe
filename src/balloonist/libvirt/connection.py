"""The one place balloonist talks to libvirt: a connection that comes back by itself.

libvirt-python is optional (``pip install 'balloonist[libvirt]'``); it is imported
only here, when a connection is opened, so every other command runs without it.

Every call goes through :meth:`Libvirt.call`, which opens the connection if there is
none and drops it when libvirt says it broke (libvirtd restarted, the socket closed),
so the next call opens a new one: the daemon rides over a libvirtd restart. libvirt's
errors become ours, with libvirt's error code kept as a field.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

from balloonist.errors import ConfigError, TransientBackendError
from balloonist.libvirt.events import DomainEvents, lifecycle_words

T = TypeVar("T")

DEFAULT_URI = "qemu:///system"

_INSTALL_HINT = (
    "the libvirt backend needs libvirt-python: pip install 'balloonist[libvirt]' "
    "(it builds against libvirt's headers: apt-get install libvirt-dev pkg-config)"
)


class LibvirtError(TransientBackendError):
    """A libvirt call failed. ``code`` is libvirt's error code (``VIR_ERR_*``);
    ``no_domain``: libvirt knows no domain by that name (any more)."""

    def __init__(
        self, message: str, *, code: int, domain: str | None = None, no_domain: bool = False
    ) -> None:
        super().__init__(message if domain is None else f"{domain}: {message}")
        self.code = code
        self.domain = domain
        self.no_domain = no_domain


def import_libvirt() -> ModuleType:
    """The ``libvirt`` module, or a ConfigError saying in one line what to install."""
    try:
        import libvirt
    except ImportError:
        raise ConfigError(_INSTALL_HINT, where="--libvirt") from None
    # libvirt prints every error to stderr unless someone handles them: we do.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    module: ModuleType = libvirt
    return module


class Libvirt:
    """A libvirt connection to ``uri``, reopened after it breaks. Thread-safe: ports
    call it from worker threads (libvirt's calls block)."""

    def __init__(
        self, uri: str = DEFAULT_URI, *, lib: ModuleType | None = None, events: bool = False
    ) -> None:
        """``lib``: the libvirt module (a fake in tests); imported when not given.
        ``events``: follow domain lifecycle events (into :attr:`events`), on libvirt's
        event loop in a thread of its own."""
        self.uri = uri
        self.lib: Any = lib if lib is not None else import_libvirt()
        self.events = DomainEvents() if events else None
        if events:
            _run_event_loop(self.lib)
        self._conn: Any = None
        self._lock = threading.Lock()
        self._opened = 0

    @property
    def reconnects(self) -> int:
        """Connections opened after the first (libvirtd restarted, the socket broke)."""
        return max(0, self._opened - 1)

    def open(self) -> None:
        """Open the connection now; an unreachable URI is a ConfigError (one line)."""
        try:
            self._connection()
        except LibvirtError as exc:
            raise ConfigError(f"cannot connect: {exc}", where=self.uri) from None

    def call(self, what: Callable[[Any], T], domain: str | None = None) -> T:
        """``what(connection)``, with libvirt's errors as :class:`LibvirtError`."""
        conn = self._connection()
        try:
            return what(conn)
        except self.lib.libvirtError as exc:
            if not _alive(conn):
                self._drop(conn)
            code = exc.get_error_code()
            raise LibvirtError(
                exc.get_error_message() or str(exc),
                code=code,
                domain=domain,
                no_domain=code == self.lib.VIR_ERR_NO_DOMAIN,
            ) from None

    def domain_call(self, name: str, what: Callable[[Any], T]) -> T:
        """``what(domain)`` on the domain called ``name``."""
        return self.call(lambda conn: what(conn.lookupByName(name)), domain=name)

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            # A dead connection closes with an error; it is closed all the same.
            with contextlib.suppress(self.lib.libvirtError):
                conn.close()

    def _connection(self) -> Any:
        with self._lock:
            if self._conn is not None and _alive(self._conn):
                return self._conn
            self._conn = None
            try:
                conn = self.lib.open(self.uri)
            except self.lib.libvirtError as exc:
                raise LibvirtError(
                    exc.get_error_message() or str(exc), code=exc.get_error_code()
                ) from None
            if self.events is not None:
                try:
                    self._follow_events(conn)
                except LibvirtError:
                    # not half-followed: the next call opens and subscribes anew
                    with contextlib.suppress(self.lib.libvirtError):
                        conn.close()
                    raise
            self._conn = conn
            self._opened += 1
            return conn

    def _follow_events(self, conn: Any) -> None:
        """Have libvirt report this connection's domain lifecycle and balloon-change
        events, and notice a libvirtd that stopped answering (keepalive: 3 missed 5 s
        probes)."""
        events, lib = self.events, self.lib
        assert events is not None

        def lifecycle(_conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
            words = lifecycle_words(lib, event, detail)
            if words is not None:
                events.lifecycle(dom.name(), words)

        def balloon(_conn: Any, dom: Any, actual_kib: int, _opaque: Any) -> None:
            if isinstance(actual_kib, int) and actual_kib >= 0:
                events.balloon(dom.name(), actual_kib)

        try:
            conn.domainEventRegisterAny(None, lib.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None)
            conn.domainEventRegisterAny(None, lib.VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE, balloon, None)
            conn.setKeepAlive(5, 3)
        except lib.libvirtError as exc:
            raise LibvirtError(
                f"cannot follow domain events: {exc.get_error_message() or exc}",
                code=exc.get_error_code(),
            ) from None

    def _drop(self, conn: Any) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn = None


_EVENT_LOOP_LOCK = threading.Lock()


def _run_event_loop(lib: Any) -> None:
    """libvirt's default event loop, once per libvirt module, in a daemon thread.
    libvirt wants it registered before the connections that use it are opened."""
    with _EVENT_LOOP_LOCK:
        if getattr(lib, "_balloonist_event_loop", False):
            return
        lib.virEventRegisterDefaultImpl()
        lib._balloonist_event_loop = True

    def run() -> None:
        while True:
            lib.virEventRunDefaultImpl()

    threading.Thread(target=run, name="libvirt-events", daemon=True).start()


def _alive(conn: Any) -> bool:
    try:
        return bool(conn.isAlive())
    except Exception:  # a broken connection may fail in any way: it is dead
        return False


__all__ = ["DEFAULT_URI", "Libvirt", "LibvirtError", "import_libvirt"]
