"""The host's own memory, from ``/proc/meminfo``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from balloonist.agent.pressure import meminfo_bytes
from balloonist.errors import BackendError

MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class HostMemInfo:
    total_bytes: int
    available_bytes: int
    swap_total_bytes: int
    swap_free_bytes: int


def parse_meminfo(text: str) -> HostMemInfo:
    """The host's figures; raises FatalBackendError without MemTotal or MemAvailable."""
    values = meminfo_bytes(text, ("MemTotal", "MemAvailable"), ("SwapTotal", "SwapFree"))
    return HostMemInfo(
        total_bytes=values["MemTotal"],
        available_bytes=values["MemAvailable"],
        swap_total_bytes=values["SwapTotal"],
        swap_free_bytes=values["SwapFree"],
    )


def read_meminfo(path: Path = MEMINFO) -> HostMemInfo:
    try:
        return parse_meminfo(path.read_text(encoding="ascii"))
    except OSError as exc:
        raise BackendError(f"cannot read {path}: {exc}") from exc
