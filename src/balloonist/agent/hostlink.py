"""The agent's end of the port: the link to the host, and what may go out on it.

:class:`HostLink` owns the link's state (``DOWN``, ``HELLO_SENT``, ``UP``; see
:mod:`balloonist.agent.main`), the port's line stream, the sequence numbers and the
message budget. It answers ``reset`` and ``welcome`` itself and hands every other host
message, in order, to the agent. :class:`Quiet` is the "at most once per interval"
rule every warning and ``error`` message follows. Stdlib only, Python 3.9.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import balloonist
from balloonist.agent import protocol as proto
from balloonist.agent.port import LineStream, PortClosedError
from balloonist.driver import UnitRange
from balloonist.errors import BalloonistError
from balloonist.rate import TokenBucket

log = logging.getLogger("balloonist.agent")

AGENT_NAME = f"balloonist-agent/{balloonist.__version__}"
#: Half the host's limits (100 messages/s on average, bursts of 500): a margin for
#: clock differences and for the host's own accounting.
MESSAGES_PER_S = 50.0
MESSAGE_BURST = 250
#: Messages a step keeps back from page reports for stats and errors.
MESSAGE_RESERVE = 4


class Link(enum.Enum):
    DOWN = "down"
    HELLO_SENT = "hello-sent"
    UP = "up"


class Quiet:
    """True at most once per ``interval_s`` for each key: one line, or one ``error``
    message, per kind of trouble, however often it happens."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._until: dict[str, float] = {}

    def due(self, key: str, now: float) -> bool:
        if now < self._until.get(key, float("-inf")):
            return False
        self._until[key] = now + self.interval_s
        return True

    def forget(self, key: str) -> None:
        self._until.pop(key, None)


@dataclass(frozen=True)
class LinkSettings:
    token: str  # 16 hex digits, the agent's for its whole life
    page_size_bytes: int
    welcome_timeout_s: float
    retry_s: float


class HostLink:
    """The link to the host (see the module docstring).

    ``on_session_up(now)`` runs when the last hello is answered; ``on_message(message,
    now)`` gets every ``target``, ``cpu_target`` and ``ack`` that arrives in a session
    (and ``freed`` at any time); others arriving outside one are counted as
    ``unexpected``. ``holding()`` says, in a link-down line, what the agent holds.
    """

    def __init__(
        self,
        open_port: Callable[[], int],
        settings: LinkSettings,
        *,
        quiet: Quiet,
        counters: Counter[str],
        on_session_up: Callable[[float], None],
        on_message: Callable[[proto.HostMessage, float], None],
        holding: Callable[[], str],
        now: float,
    ) -> None:
        self.settings = settings
        self.state = Link.DOWN
        #: What the host's limit on messages leaves this agent.
        self.budget = TokenBucket(MESSAGES_PER_S, MESSAGE_BURST, now)
        self._open_port = open_port
        self._quiet = quiet
        self._counters = counters
        self._on_session_up = on_session_up
        self._on_message = on_message
        self._stream: LineStream | None = None
        self._seq = 0  # never restarts: increasing across sessions is increasing within
        #: The session's protocol version, as the host's welcome named it.
        self.version = proto.VERSION
        self._hellos_unanswered = 0
        self._retry_at = now
        self._welcome_deadline = 0.0
        self._last_down_reason = ""
        self._holding = holding

    @property
    def up(self) -> bool:
        return self.state is Link.UP

    # -- receiving -----------------------------------------------------------------------

    def service(self, now: float) -> None:
        """Open the port when due, read what the host sent, and act on it in order."""
        self.budget.refill(now)
        if self.state is Link.DOWN and now >= self._retry_at:
            self._connect(now)
        if self._stream is None:
            return
        try:
            lines = self._stream.read_lines()
        except PortClosedError as exc:
            self.disconnect(now, str(exc))
            return
        overlong = self._stream.take_overlong_lines()
        if overlong:
            self._counters["bad_lines"] += overlong
            if self._quiet.due("bad-line", now):
                log.warning("dropped %d overlong line(s) from the host", overlong)
        for line in lines:
            try:
                message = proto.decode_host_message(line)
            except proto.ProtocolError as exc:
                self._counters["bad_lines"] += 1
                if self._quiet.due("bad-line", now):
                    log.warning("dropped a bad line from the host: %s", exc)
                continue
            self._handle(message, now)
            if self._stream is None:
                return
        if self.state is Link.HELLO_SENT and now >= self._welcome_deadline:
            self.disconnect(now, f"no welcome within {self.settings.welcome_timeout_s:g} s")

    def _connect(self, now: float) -> None:
        try:
            fd = self._open_port()
        except (OSError, BalloonistError) as exc:
            self._retry_at = now + self.settings.retry_s
            self._note_down(f"cannot open the port: {exc}")
            return
        self._stream = LineStream(fd)
        # Say hello at once: a daemon that connected long ago sent its reset to whoever
        # had the port then. A daemon connecting now sends a reset too; that gets
        # another hello, and the session starts when the last hello is answered.
        self._hello(now)

    def _hello(self, now: float) -> None:
        self.state = Link.HELLO_SENT
        self._hellos_unanswered += 1
        self._welcome_deadline = now + self.settings.welcome_timeout_s
        self.send(
            proto.Hello(
                seq=self.next_seq(),
                version=proto.VERSION,
                agent=AGENT_NAME,
                page_size=self.settings.page_size_bytes,
                token=self.settings.token,
            )
        )

    def _handle(self, message: proto.HostMessage, now: float) -> None:
        if isinstance(message, proto.Reset):
            # The host knows nothing of us (it connected, or restarted): a new session.
            self._counters["resets"] += 1
            self._hello(now)
        elif isinstance(message, proto.Welcome):
            if self._hellos_unanswered == 0:
                self._counters["unexpected"] += 1
                return
            if message.version not in proto.VERSIONS:
                self.disconnect(now, f"the host speaks protocol {message.version}, not 1 or 2")
                return
            self.version = message.version
            self._hellos_unanswered -= 1
            if self._hellos_unanswered == 0:
                self.state = Link.UP
                self._last_down_reason = ""
                self._on_session_up(now)
        elif isinstance(message, (proto.Target, proto.CpuTarget)) and not self.up:
            self._counters["unexpected"] += 1
        else:
            self._on_message(message, now)

    def disconnect(self, now: float, reason: str) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self.state = Link.DOWN
        self._hellos_unanswered = 0
        self._retry_at = now + self.settings.retry_s
        self._counters["disconnects"] += 1
        self._note_down(f"{reason}; {self._holding()}")

    def _note_down(self, reason: str) -> None:
        # One line per new reason; a host that stays away is not worth a line per retry.
        if reason != self._last_down_reason:
            log.info("link down: %s (retrying every %g s)", reason, self.settings.retry_s)
            self._last_down_reason = reason

    # -- sending -------------------------------------------------------------------------

    def next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def report_budget_ranges(self) -> int:
        """How many ranges page reports may still carry this step."""
        messages = max(0, int(self.budget.tokens) - MESSAGE_RESERVE)
        return messages * proto.MAX_RANGES_PER_MESSAGE

    def send(self, message: proto.GuestMessage) -> None:
        if self._stream is not None:
            self._stream.send(proto.encode(message, self.version))
            self.budget.spend()
            self._counters["sent"] += 1

    def send_ranges(
        self, kind: type[proto.Locked] | type[proto.Unlocked], ranges: Sequence[UnitRange]
    ) -> None:
        for part in proto.split_ranges(list(ranges)):
            self.send(kind(seq=self.next_seq(), ranges=part))

    def send_error(self, code: str, message: str, now: float) -> None:
        """An ``error`` to the host, in a session and at most once per interval per code."""
        if self.up and self._quiet.due(code, now):
            text = "".join(c if c.isprintable() else "?" for c in message)
            self.send(proto.Error(seq=self.next_seq(), code=code, message=text[:200]))

    def flush(self, now: float) -> None:
        if self._stream is not None:
            try:
                self._stream.flush()
            except PortClosedError as exc:
                self.disconnect(now, str(exc))

    def close(self, drain_s: float) -> None:
        """Wait up to ``drain_s`` for what is queued to leave, then close the port."""
        if self._stream is not None:
            try:
                self._stream.drain(drain_s)
            except PortClosedError as exc:
                log.warning("at shutdown: %s", exc)
            self._stream.close()
            self._stream = None
        self.state = Link.DOWN
