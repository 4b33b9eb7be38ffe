"""The one exception tree of balloonist.

    BalloonistError
     ├── ConfigError            bad user input (scenario file, CLI argument); exit code 2
     │    └── SizeError         a size string without a unit, or out of range
     ├── GuestProtocolError     a guest sent something we refuse (untrusted input)
     ├── BackendError           the hypervisor backend failed
     │    ├── TransientBackendError   worth retrying (disconnect, timeout)
     │    ├── FatalBackendError       not worth retrying (no balloon device, refused)
     │    └── HostCommandError        a host command (swapon, mkswap) failed
     ├── SimulationError        the simulator found one of its invariants broken (a bug)
     ├── StateError             a lifecycle asked to make a move it does not allow (a bug)
     └── WorkerError            a process running a simulation died without an error of its own

Library code raises these and never exits; only the CLI turns them into exit codes.
"""

from __future__ import annotations

import enum


class BalloonistError(Exception):
    """Base of every error balloonist raises on purpose."""


class ConfigError(BalloonistError):
    """Bad user input. ``where`` names the file and key, so the CLI can print one line;
    ``field``, where there is one, is the setting the rule is about, as a
    ``GuestChange`` spells it (``min_bytes``, ``max_cpus``, ``tax_rate``...), for code
    that must point at it (the API's 422) without reading the message."""

    def __init__(self, message: str, *, where: str = "", field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where
        self.field = field

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class SizeError(ConfigError):
    """A size that is not a number with a unit, or is out of range."""


class Violation(enum.Enum):
    """How a guest broke the protocol: each is a counter of its own."""

    MALFORMED = "malformed"  # not a message: bad JSON, fields or types, a line too long
    FLOOD = "flood"  # more messages a second than the protocol allows
    OUT_OF_ORDER = "out_of_order"  # a sequence number not above the last
    UNSUPPORTED = "unsupported"  # a protocol version or page size the host does not speak
    BAD_PAGES = "bad_pages"  # pages that are not guest RAM, or not (or already) ballooned
    TOO_LARGE = "too_large"  # a balloon larger than the guest
    UNASKED = "unasked"  # a report the host did not ask for, or of vCPUs it does not have


class GuestProtocolError(BalloonistError):
    """A guest reported something impossible or hostile; it is refused, never trusted.
    ``violation`` says which rule it broke."""

    def __init__(self, message: str, *, violation: Violation = Violation.MALFORMED) -> None:
        super().__init__(message)
        self.violation = violation


class BackendError(BalloonistError):
    """The hypervisor backend failed."""


class TransientBackendError(BackendError):
    """A failure that may go away on retry (a dropped connection, a timeout)."""


class FatalBackendError(BackendError):
    """A failure that retrying will not fix (no balloon device, command refused)."""


class HostCommandError(BackendError):
    """A command run on the host failed: ``command`` as run, ``said`` what it wrote
    to stderr (or why it could not run)."""

    def __init__(self, command: tuple[str, ...], *, said: str) -> None:
        super().__init__(f"{' '.join(command)} failed: {said}")
        self.command = command
        self.said = said


class SimulationError(BalloonistError):
    """The simulator caught one of its own invariants broken: a bug, never user error."""


class StateError(BalloonistError):
    """Something was asked to move between two states its lifecycle does not connect:
    a bug in the caller, never a guest's or a user's doing."""

    def __init__(self, what: str, state: enum.Enum, to: enum.Enum) -> None:
        super().__init__(f"{what}: no move from {state.name} to {to.name}")
        self.what = what
        self.state = state
        self.to = to


class WorkerError(BalloonistError):
    """A worker process died (killed, out of memory) mid-run. ``policies`` are the
    runs under way when it did: one of them was in the process that died (empty if
    it died before its run began)."""

    def __init__(self, message: str, *, policies: tuple[str, ...]) -> None:
        super().__init__(message)
        self.message = message
        self.policies = policies
