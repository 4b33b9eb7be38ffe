"""The one exception tree of balloonist.

    BalloonistError
     ├── ConfigError            bad user input (scenario file, CLI argument); exit code 2
     │    └── SizeError         a size string without a unit, or out of range
     ├── GuestProtocolError     a guest sent something we refuse (untrusted input)
     ├── BackendError           the hypervisor backend failed
     │    ├── TransientBackendError   worth retrying (disconnect, timeout)
     │    └── FatalBackendError       not worth retrying (no balloon device, refused)
     ├── SimulationError        the simulator found one of its invariants broken (a bug)
     └── WorkerError            a process running a simulation died without an error of its own

Library code raises these and never exits; only the CLI turns them into exit codes.
"""

from __future__ import annotations


class BalloonistError(Exception):
    """Base of every error balloonist raises on purpose."""


class ConfigError(BalloonistError):
    """Bad user input. ``where`` names the file and key, so the CLI can print one line."""

    def __init__(self, message: str, *, where: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class SizeError(ConfigError):
    """A size that is not a number with a unit, or is out of range."""


class GuestProtocolError(BalloonistError):
    """A guest reported something impossible or hostile; it is refused, never trusted."""


class BackendError(BalloonistError):
    """The hypervisor backend failed."""


class TransientBackendError(BackendError):
    """A failure that may go away on retry (a dropped connection, a timeout)."""


class FatalBackendError(BackendError):
    """A failure that retrying will not fix (no balloon device, command refused)."""


class SimulationError(BalloonistError):
    """The simulator caught one of its own invariants broken: a bug, never user error."""


class WorkerError(BalloonistError):
    """A worker process running ``policy`` died (killed, out of memory) mid-run."""

    def __init__(self, message: str, *, policy: str) -> None:
        super().__init__(message)
        self.message = message
        self.policy = policy
