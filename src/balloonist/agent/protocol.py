"""The agent wire protocol, version 2: one JSON object per line over virtio-serial.

Both ends import this module, so it is stdlib only and runs on Python 3.9. The
specification, with the safety rules each side follows, is ``docs/agent-protocol.md``;
this is its one implementation. Decoding is strict, because the host decodes what a
guest sent and a guest is not trusted:

- a line is at most ``MAX_LINE_BYTES`` bytes, UTF-8, one JSON object;
- every message has exactly the fields of its type: unknown, missing, duplicated or
  mistyped fields are refused (a ``bool`` is not an ``int``; ``NaN`` is not a number);
- every number is within a bound, every list within a length, every string short;
- page ranges in one message are non-empty and do not overlap;
- vCPU lists are strictly increasing, and a vCPU is never both online and reserved.

Anything else raises :class:`ProtocolError` naming what was wrong. Checks that
need the guest's size (a range beyond its RAM) belong to the host.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Union

from balloonist.driver import UnitRange
from balloonist.errors import GuestProtocolError

VERSION = 2
#: The versions either side speaks. A session runs at the lower of the two ends'
#: (the host's ``welcome`` names it); version 1's ``stats`` lacks the stall total and
#: the swap in use (``V2_STATS_FIELDS``), so a guest with an older agent still works.
VERSIONS = (1, 2)
#: The ``stats`` fields a version-1 session leaves out.
V2_STATS_FIELDS = ("psi_some_total_us", "swap_used_bytes")
#: Longest line either side sends or accepts, newline included.
MAX_LINE_BYTES = 16 * 1024
#: Ranges per ``locked``/``unlocked`` message; a larger report is split.
MAX_RANGES_PER_MESSAGE = 256
#: Page frame numbers stay below 2**40 (4 PiB of 4 KiB pages).
MAX_PFN = 1 << 40
MAX_COUNTER = 1 << 62
MAX_TEXT_CHARS = 200
MAX_SEQ = 1 << 53
#: vCPU numbers in CPU messages are below this. QEMU 7.2 takes at most 255 vCPUs on
#: its pc machine and 288 on q35 (our launcher, 64); a report naming every one of
#: MAX_VCPUS fits a line with room to spare (about 5 KiB).
MAX_VCPUS = 1024
#: The serial port's name in the guest (``/dev/virtio-ports/<name>``) and in QEMU.
PORT_NAME = "org.balloonist.agent.0"

#: Error codes a guest may send (``error`` messages).
ERROR_CODES = frozenset(
    {
        "alloc-failed",
        "pressure",
        "pagemap",
        "internal",
        "bad-message",
        # Only in a session where the host has sent ``cpu_target`` (see Cpus):
        "cpu-refused",  # a CPU target the guest will not meet; the balloon stays as it is
        "cpu-failed",  # the guest kernel refused to take a vCPU offline or bring it back
    }
)


class ProtocolError(GuestProtocolError):
    """A message that breaks the protocol (either side's); ``str()`` says what and where."""


# -- messages ------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """Guest -> host, first message of a session."""

    seq: int
    version: int
    agent: str
    page_size: int
    #: 16 hex digits the agent writes at the start of every page it holds; the host
    #: checks them before freeing a page's memory (see the safety rules).
    token: str


@dataclass(frozen=True)
class Locked:
    """Guest -> host: these pages are pinned in the balloon; their memory may go."""

    seq: int
    ranges: tuple[UnitRange, ...]


@dataclass(frozen=True)
class Unlocked:
    """Guest -> host: these pages leave the balloon; the guest will use them again."""

    seq: int
    ranges: tuple[UnitRange, ...]


@dataclass(frozen=True)
class Stats:
    """Guest -> host, about once a second: the balloon and the guest's memory pressure."""

    seq: int
    balloon_pages: int
    rate_pages: int
    mem_total_bytes: int
    mem_available_bytes: int
    #: PSI memory "some" and "full" avg10, percent; -1 when the kernel has no PSI.
    psi_some_avg10: float
    psi_full_avg10: float
    #: Cumulative counters from /proc/vmstat.
    refaults: int
    swap_in_pages: int
    swap_out_pages: int
    #: Since version 2; None in a version-1 session. Microseconds some task stalled on
    #: memory since boot (PSI "some" total; -1 without PSI), and the guest's swap in use.
    psi_some_total_us: int | None = None
    swap_used_bytes: int | None = None


@dataclass(frozen=True)
class Error:
    """Guest -> host: something the host should know (it is not acknowledged)."""

    seq: int
    code: str
    message: str


@dataclass(frozen=True)
class Cpus:
    """Guest -> host: which vCPUs are online, and which the CPU balloon holds offline.

    Sent only in a session where the host has sent ``cpu_target`` (right after each
    one, and after every change), so a host that never does never sees one.
    """

    seq: int
    online: tuple[int, ...]
    reserved: tuple[int, ...]


@dataclass(frozen=True)
class Welcome:
    """Host -> guest, the answer to ``hello``."""

    seq: int
    version: int


@dataclass(frozen=True)
class Reset:
    """Host -> guest, first on every connection: the host knows nothing of this agent.

    The agent answers with ``hello`` and then reports every page it still holds as
    ``locked``, so a restarted daemon finds the balloon where it was.
    """

    seq: int


@dataclass(frozen=True)
class Target:
    """Host -> guest: the balloon register; the balloon should hold this many pages."""

    seq: int
    balloon_pages: int


@dataclass(frozen=True)
class CpuTarget:
    """Host -> guest: the CPU balloon register; the balloon should hold this many vCPUs."""

    seq: int
    reserved_vcpus: int


@dataclass(frozen=True)
class Ack:
    """Host -> guest: a ``locked``/``unlocked`` report was handled.

    ``freed_pages`` is how many of the reported pages the host verified and freed.
    """

    seq: int
    freed_pages: int


GuestMessage = Union[Hello, Locked, Unlocked, Stats, Error, Cpus]
HostMessage = Union[Welcome, Reset, Target, Ack, CpuTarget]
Message = Union[GuestMessage, HostMessage]

# -- encoding ------------------------------------------------------------------------

_TYPE_NAMES: dict[type, str] = {
    Hello: "hello",
    Locked: "locked",
    Unlocked: "unlocked",
    Stats: "stats",
    Error: "error",
    Cpus: "cpus",
    Welcome: "welcome",
    Reset: "reset",
    Target: "target",
    Ack: "ack",
    CpuTarget: "cpu_target",
}


def encode(message: Message, version: int = VERSION) -> bytes:
    """One line, newline included, for a session at ``version``. Raises ProtocolError
    if it would be refused."""
    fields: dict[str, Any] = {"type": _TYPE_NAMES[type(message)]}
    wanted = _fields(type(message), version)
    for name, value in vars(message).items():
        if name in wanted:
            fields[name] = [[r.start, r.count] for r in value] if name == "ranges" else value
    line = json.dumps(fields, separators=(",", ":"), allow_nan=False).encode() + b"\n"
    # Check our own output with the same rules the other side applies.
    types = _GUEST_TYPES if type(message) in _GUEST_TYPES.values() else _HOST_TYPES
    _decode(line, types, version)
    return line


def split_ranges(ranges: list[UnitRange]) -> list[tuple[UnitRange, ...]]:
    """Chunks of at most MAX_RANGES_PER_MESSAGE ranges, in order."""
    step = MAX_RANGES_PER_MESSAGE
    return [tuple(ranges[i : i + step]) for i in range(0, len(ranges), step)]


# -- decoding ------------------------------------------------------------------------


def decode_guest_message(line: bytes, version: int = VERSION) -> GuestMessage:
    """Decode one line a guest sent in a session at ``version`` (the host side)."""
    return _decode(line, _GUEST_TYPES, version)  # type: ignore[return-value]


def decode_host_message(line: bytes, version: int = VERSION) -> HostMessage:
    """Decode one line the host sent in a session at ``version`` (the agent side)."""
    return _decode(line, _HOST_TYPES, version)  # type: ignore[return-value]


def _fields(cls: type, version: int) -> dict[str, Callable[[object], Any]]:
    """The fields a message of ``cls`` has in a session at ``version``."""
    checks = _FIELDS[cls]
    if cls is Stats and version < 2:
        return {k: v for k, v in checks.items() if k not in V2_STATS_FIELDS}
    return checks


def _decode(line: bytes, types: dict[str, type], version: int) -> Message:
    if len(line) > MAX_LINE_BYTES:
        raise ProtocolError(f"line of {len(line)} bytes, limit {MAX_LINE_BYTES}")
    try:
        raw = json.loads(
            line.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
        )
    except ProtocolError:
        raise
    except RecursionError:
        raise ProtocolError("nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"not a JSON line: {exc}") from None
    if not isinstance(raw, dict):
        raise ProtocolError(f"a message is a JSON object, got {type(raw).__name__}")
    kind = raw.pop("type", None)
    cls = types.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {str(kind)[:40]!r}")
    checks = _fields(cls, version)
    if set(raw) != set(checks):
        missing = sorted(set(checks) - set(raw))
        extra = sorted(set(raw) - set(checks))
        what = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing)}" if missing else "",
                f"unknown {', '.join(k[:40] for k in extra[:5])}" if extra else "",
            )
            if part
        )
        raise ProtocolError(f"{kind}: {what}")
    values = {}
    for name, check in checks.items():
        try:
            values[name] = check(raw[name])
        except ProtocolError as exc:
            raise ProtocolError(f"{kind}.{name}: {exc}") from None
    message = cls(**values)
    if isinstance(message, Cpus):
        both = set(message.online) & set(message.reserved)
        if both:
            raise ProtocolError(f"cpus: vCPU {min(both)} both online and reserved")
    return message  # type: ignore[no-any-return]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ProtocolError(f"field {key[:40]!r} given twice")
        out[key] = value
    return out


def _no_constants(name: str) -> None:
    raise ProtocolError(f"{name} is not a number here")


def _int(lo: int, hi: int) -> Callable[[object], int]:
    def check(value: object) -> int:
        if type(value) is not int:
            raise ProtocolError(f"expected an integer, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise ProtocolError(f"{value} outside [{lo}, {hi}]")
        return value

    return check


def _percent(value: object) -> float:
    if type(value) not in (int, float):
        raise ProtocolError(f"expected a number, got {type(value).__name__}")
    number = float(value)  # type: ignore[arg-type]
    if not (number == -1.0 or 0.0 <= number <= 100.0) or math.isnan(number):
        raise ProtocolError(f"{number} is not a percentage (or -1)")
    return number


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"expected a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT_CHARS or not value.isprintable():
        raise ProtocolError(f"text must be printable and at most {MAX_TEXT_CHARS} chars")
    return value


def _token(value: object) -> str:
    text = _text(value)
    if len(text) != 16 or any(c not in "0123456789abcdef" for c in text):
        raise ProtocolError("token must be 16 lowercase hex digits")
    return text


def _code(value: object) -> str:
    text = _text(value)
    if text not in ERROR_CODES:
        raise ProtocolError(f"unknown error code {text[:40]!r}")
    return text


def _ranges(value: object) -> tuple[UnitRange, ...]:
    if not isinstance(value, list):
        raise ProtocolError(f"expected a list of [start, count], got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_RANGES_PER_MESSAGE:
        raise ProtocolError(f"{len(value)} ranges, must be 1 to {MAX_RANGES_PER_MESSAGE}")
    start_of, count_of = _int(0, MAX_PFN - 1), _int(1, MAX_PFN)
    ranges = []
    for item in value:
        if not isinstance(item, list) or len(item) != 2:
            raise ProtocolError("each range is [start, count]")
        page_range = UnitRange(start_of(item[0]), count_of(item[1]))
        if page_range.end > MAX_PFN:
            raise ProtocolError(f"range {page_range.start}+{page_range.count} past {MAX_PFN}")
        ranges.append(page_range)
    ordered = sorted(ranges, key=lambda r: r.start)
    for before, after in zip(ordered, ordered[1:]):
        if after.start < before.end:
            raise ProtocolError(f"ranges overlap at page {after.start}")
    return tuple(ranges)


def _vcpus(min_count: int) -> Callable[[object], tuple[int, ...]]:
    def check(value: object) -> tuple[int, ...]:
        if not isinstance(value, list):
            raise ProtocolError(f"expected a list of vCPU numbers, got {type(value).__name__}")
        if not min_count <= len(value) <= MAX_VCPUS:
            raise ProtocolError(f"{len(value)} vCPUs, must be {min_count} to {MAX_VCPUS}")
        number = _int(0, MAX_VCPUS - 1)
        cpus = tuple(number(item) for item in value)
        for before, after in zip(cpus, cpus[1:]):
            if after <= before:
                raise ProtocolError(f"vCPU {after} after {before}: not strictly increasing")
        return cpus

    return check


_seq = _int(0, MAX_SEQ)
_pages = _int(0, MAX_PFN)
_bytes = _int(0, MAX_PFN * 4096)
_counter = _int(0, MAX_COUNTER)

_FIELDS: dict[type, dict[str, Callable[[object], Any]]] = {
    Hello: {
        "seq": _seq,
        "version": _int(1, 1000),
        "agent": _text,
        "page_size": _int(4096, 1 << 30),
        "token": _token,
    },
    Locked: {"seq": _seq, "ranges": _ranges},
    Unlocked: {"seq": _seq, "ranges": _ranges},
    Stats: {
        "seq": _seq,
        "balloon_pages": _pages,
        "rate_pages": _pages,
        "mem_total_bytes": _bytes,
        "mem_available_bytes": _bytes,
        "psi_some_avg10": _percent,
        "psi_full_avg10": _percent,
        "refaults": _counter,
        "swap_in_pages": _counter,
        "swap_out_pages": _counter,
        "psi_some_total_us": _int(-1, MAX_COUNTER),
        "swap_used_bytes": _bytes,
    },
    Error: {"seq": _seq, "code": _code, "message": _text},
    # A guest always has a vCPU online, so the balloon never holds all of them.
    Cpus: {"seq": _seq, "online": _vcpus(1), "reserved": _vcpus(0)},
    Welcome: {"seq": _seq, "version": _int(1, 1000)},
    Reset: {"seq": _seq},
    Target: {"seq": _seq, "balloon_pages": _pages},
    Ack: {"seq": _seq, "freed_pages": _pages},
    CpuTarget: {"seq": _seq, "reserved_vcpus": _int(0, MAX_VCPUS - 1)},
}
_GUEST_TYPES: dict[str, type] = {
    "hello": Hello,
    "locked": Locked,
    "unlocked": Unlocked,
    "stats": Stats,
    "error": Error,
    "cpus": Cpus,
}
_HOST_TYPES: dict[str, type] = {
    "welcome": Welcome,
    "reset": Reset,
    "target": Target,
    "ack": Ack,
    "cpu_target": CpuTarget,
}

__all__ = [
    "MAX_LINE_BYTES",
    "MAX_RANGES_PER_MESSAGE",
    "MAX_VCPUS",
    "PORT_NAME",
    "V2_STATS_FIELDS",
    "VERSION",
    "VERSIONS",
    "Ack",
    "CpuTarget",
    "Cpus",
    "Error",
    "GuestMessage",
    "Hello",
    "HostMessage",
    "Locked",
    "Message",
    "ProtocolError",
    "Reset",
    "Stats",
    "Target",
    "Unlocked",
    "Welcome",
    "decode_guest_message",
    "decode_host_message",
    "encode",
    "split_ranges",
]
