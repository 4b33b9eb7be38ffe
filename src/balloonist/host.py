"""The host's own memory, from ``/proc/meminfo``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from balloonist.errors import BackendError
from balloonist.units import KIB

MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class HostMemInfo:
    total_bytes: int
    available_bytes: int
    swap_total_bytes: int
    swap_free_bytes: int


def parse_meminfo(text: str) -> HostMemInfo:
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[key.strip()] = int(fields[0]) * (KIB if fields[1:] == ["kB"] else 1)
    try:
        return HostMemInfo(
            total_bytes=values["MemTotal"],
            available_bytes=values["MemAvailable"],
            swap_total_bytes=values.get("SwapTotal", 0),
            swap_free_bytes=values.get("SwapFree", 0),
        )
    except KeyError as exc:
        raise BackendError(f"/proc/meminfo has no {exc.args[0]}") from None


def read_meminfo(path: Path = MEMINFO) -> HostMemInfo:
    try:
        return parse_meminfo(path.read_text(encoding="ascii"))
    except OSError as exc:
        raise BackendError(f"cannot read {path}: {exc}") from exc
