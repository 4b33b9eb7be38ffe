"""The guest's memory pressure, as the agent reads it from ``/proc``.

Three sources, each parsed from text by a pure function and read by a thin reader
whose paths tests replace with fake files:

- ``/proc/meminfo``: ``MemTotal`` and ``MemAvailable``, the pressure guard's inputs,
  and the swap in use (``SwapTotal - SwapFree``);
- ``/proc/pressure/memory`` (PSI): the share of time tasks stalled on memory, "some"
  and "full" ``avg10`` in percent, and the "some" ``total`` in microseconds since
  boot; ``-1`` for each when the kernel has no PSI;
- ``/proc/vmstat``: cumulative refaults (``workingset_refault_anon`` +
  ``workingset_refault_file``, or ``workingset_refault`` before Linux 5.9), ``pswpin``
  and ``pswpout``, reported to the host in ``stats`` messages.

Every read is bounded (``MAX_PROC_FILE_BYTES``, ``MAX_NUMBER_DIGITS``) so a strange
``/proc`` cannot make the agent parse without end. Stdlib only, Python 3.9.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from balloonist.errors import FatalBackendError, TransientBackendError

#: Far above what any of the three files holds (/proc/vmstat is a few KiB).
MAX_PROC_FILE_BYTES = 256 * 1024
#: 2**64 has 20 digits; anything longer is not a kernel counter.
MAX_NUMBER_DIGITS = 20
#: PSI values the kernel prints with two decimals; a longer field is not PSI.
_MAX_PSI_FIELD_CHARS = 32

NO_PSI = -1.0
NO_PSI_TOTAL = -1

MEMINFO_PATH = Path("/proc/meminfo")
VMSTAT_PATH = Path("/proc/vmstat")
PSI_MEMORY_PATH = Path("/proc/pressure/memory")


@dataclass(frozen=True)
class PressureSample:
    mem_total_bytes: int
    mem_available_bytes: int
    #: Percent of the last 10 s some (or all) tasks stalled on memory; -1.0 without PSI.
    psi_some_avg10: float
    psi_full_avg10: float
    #: Cumulative since boot.
    refaults: int
    swap_in_pages: int
    swap_out_pages: int
    #: Microseconds some task stalled on memory since boot; NO_PSI_TOTAL without PSI.
    psi_some_total_us: int = -1
    swap_used_bytes: int = 0


class PressureSource(Protocol):
    """Where the agent gets its pressure readings (``/proc``, or a fake in tests)."""

    def read(self) -> PressureSample: ...


def _number(text: str) -> int | None:
    if not text.isdigit() or len(text) > MAX_NUMBER_DIGITS:
        return None
    return int(text)


def meminfo_bytes(
    text: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, int]:
    """The named ``/proc/meminfo`` fields in bytes, an optional one 0 where missing;
    the guest's and the host's both are read here. Raises FatalBackendError for a
    required field missing or a named field that is not a bounded number."""
    wanted = (*required, *optional)
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key not in wanted:
            continue
        fields = rest.split()
        number = _number(fields[0]) if fields else None
        if number is None or fields[1:] not in ([], ["kB"]):
            raise FatalBackendError(f"meminfo: cannot read {line.strip()[:80]!r}")
        values[key] = number * 1024 if fields[1:] == ["kB"] else number
    missing = [k for k in required if k not in values]
    if missing:
        # MemAvailable exists since Linux 3.14; without it the guard has nothing to go on.
        raise FatalBackendError(f"meminfo: no {', '.join(missing)} (Linux 3.14 or later needed)")
    return {key: values.get(key, 0) for key in wanted}


def parse_meminfo(text: str) -> tuple[int, int, int]:
    """``(MemTotal, MemAvailable, swap in use)`` in bytes. Raises FatalBackendError if
    either of the first two is missing; a guest without swap uses none."""
    values = meminfo_bytes(text, ("MemTotal", "MemAvailable"), ("SwapTotal", "SwapFree"))
    swap_used = max(0, values["SwapTotal"] - values["SwapFree"])
    return values["MemTotal"], values["MemAvailable"], swap_used


def parse_vmstat(text: str) -> tuple[int, int, int]:
    """``(refaults, swap_in_pages, swap_out_pages)``; a counter the kernel lacks counts 0."""
    values: dict[str, int] = {}
    wanted = (
        "workingset_refault",
        "workingset_refault_anon",
        "workingset_refault_file",
        "pswpin",
        "pswpout",
    )
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] in wanted:
            number = _number(fields[1])
            if number is not None:
                values[fields[0]] = number
    if "workingset_refault_anon" in values or "workingset_refault_file" in values:
        refaults = values.get("workingset_refault_anon", 0) + values.get(
            "workingset_refault_file", 0
        )
    else:  # before Linux 5.9 there was one counter
        refaults = values.get("workingset_refault", 0)
    return refaults, values.get("pswpin", 0), values.get("pswpout", 0)


def parse_psi(text: str) -> tuple[float, float, int]:
    """``(some avg10, full avg10, some total)``: the two in percent, each NO_PSI if its
    line is absent or odd; the total in microseconds, NO_PSI_TOTAL if absent or odd."""
    found = {"some": NO_PSI, "full": NO_PSI}
    total_us = NO_PSI_TOTAL
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0] not in found:
            continue
        for field in fields[1:]:
            key, _, value = field.partition("=")
            if key == "avg10" and len(value) <= _MAX_PSI_FIELD_CHARS:
                try:
                    number = float(value)
                except ValueError:
                    continue
                if 0.0 <= number <= 100.0:  # also refuses nan and inf
                    found[fields[0]] = number
            elif key == "total" and fields[0] == "some":
                total = _number(value)
                if total is not None:
                    total_us = total
    return found["some"], found["full"], total_us


def read_bounded(path: Path) -> str:
    """At most MAX_PROC_FILE_BYTES of a text file (a longer one is cut, not refused)."""
    with path.open("rb") as f:
        return f.read(MAX_PROC_FILE_BYTES).decode("ascii", errors="replace")


class ProcPressure:
    """Reads the three files; paths are injectable so tests can use fake ones."""

    def __init__(
        self,
        meminfo_path: Path = MEMINFO_PATH,
        vmstat_path: Path = VMSTAT_PATH,
        psi_path: Path = PSI_MEMORY_PATH,
    ) -> None:
        self.meminfo_path = meminfo_path
        self.vmstat_path = vmstat_path
        self.psi_path = psi_path

    def read(self) -> PressureSample:
        try:
            total, available, swap_used = parse_meminfo(read_bounded(self.meminfo_path))
            refaults, swap_in, swap_out = parse_vmstat(read_bounded(self.vmstat_path))
        except OSError as exc:
            raise TransientBackendError(f"cannot read guest memory state: {exc}") from exc
        try:
            some, full, some_total_us = parse_psi(read_bounded(self.psi_path))
        except OSError:  # no CONFIG_PSI, or booted with psi=0 (EOPNOTSUPP)
            some, full, some_total_us = NO_PSI, NO_PSI, NO_PSI_TOTAL
        return PressureSample(
            mem_total_bytes=total,
            mem_available_bytes=available,
            psi_some_avg10=some,
            psi_full_avg10=full,
            refaults=refaults,
            swap_in_pages=swap_in,
            swap_out_pages=swap_out,
            psi_some_total_us=some_total_us,
            swap_used_bytes=swap_used,
        )
