"""Page sharing on the host (KSM): when to run it, and what it reports.

Linux's KSM (``/sys/kernel/mm/ksm``) merges identical anonymous pages of the
processes that ask for it; QEMU asks for its guests' RAM by default. Merging costs
the host processor time (``ksmd`` compares pages), so, as ksmtuned and oVirt MOM do,
it is worth running only while memory is short: off while the VMs' free memory is
plentiful, and scanning faster the less is free.

:func:`ksm_setting` is that rule, pure. :class:`SysKernelKsm` reads and writes the
kernel's knobs and totals; :func:`parse_ksm_stat` reads what one process gained
(``/proc/PID/ksm_stat``). The daemon's side (who manages KSM, an administrator or
balloonist) is :mod:`balloonist.daemon.ksm_control`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from balloonist.errors import BackendError, FatalBackendError
from balloonist.units import PAGE_SIZE_BYTES

#: The kernel's KSM directory (tests point the daemon elsewhere).
KSM_ROOT: Final = Path("/sys/kernel/mm/ksm")

#: ``run``'s values (Documentation/admin-guide/mm/ksm.rst). Balloonist writes only
#: STOP and RUN: stopping keeps what was merged, unmerging would make every VM's
#: memory jump back up at once.
RUN_STOP: Final = 0
RUN_RUN: Final = 1

#: A knob's value is a small number; anything longer is not what the kernel writes.
_MAX_KNOB_CHARS: Final = 24


@dataclass(frozen=True)
class KsmParams:
    """When balloonist runs KSM, and how fast (``[ksm]`` in host.toml).

    Free memory is the VMs' free share of what they may use (their budget, or less
    when the host is short), as the host counts what they hold.
    """

    #: Start merging when free memory falls below this share (ksmtuned: 20 %).
    start_below_free: float = 0.20
    #: Stop once it is back above this share: the gap keeps KSM from flapping on and
    #: off around one threshold as merging itself frees memory.
    stop_above_free: float = 0.30
    #: Pages to scan per wake-up, from the kernel's default at the start threshold up
    #: to the maximum with no free memory left (ksmtuned goes from 64 to 1250).
    pages_to_scan_min: int = 100
    pages_to_scan_max: int = 1000
    #: Sleep between wake-ups (the kernel's default). At the maximum this scans about
    #: 200 MB/s, a fraction of one core.
    sleep_ms: int = 20

    def __post_init__(self) -> None:
        if not 0.0 < self.start_below_free <= self.stop_above_free < 1.0:
            raise ValueError(
                "need 0 < start_below_free <= stop_above_free < 1, got "
                f"{self.start_below_free} and {self.stop_above_free}"
            )
        if not 1 <= self.pages_to_scan_min <= self.pages_to_scan_max:
            raise ValueError(
                "need 1 <= pages_to_scan_min <= pages_to_scan_max, got "
                f"{self.pages_to_scan_min} and {self.pages_to_scan_max}"
            )
        if self.sleep_ms < 1:
            raise ValueError(f"sleep_ms must be at least 1, got {self.sleep_ms}")


@dataclass(frozen=True)
class KsmKnobs:
    """The knobs balloonist sets, as the kernel has them."""

    run: int  # RUN_STOP, RUN_RUN, or 2 (unmerge), as someone else may set it
    pages_to_scan: int
    sleep_ms: int

    @property
    def running(self) -> bool:
        return self.run == RUN_RUN


@dataclass(frozen=True)
class KsmTotals:
    """What KSM has done on the whole host."""

    pages_shared: int  # merged pages the host keeps, one per distinct content
    pages_sharing: int  # pages that map one of those: the pages saved
    full_scans: int
    #: What merging saved, less KSM's own bookkeeping (Linux 6.1+); None before.
    profit_bytes: int | None

    @property
    def saved_bytes(self) -> int:
        """Memory merging saved: the kernel's own profit where it reports one."""
        if self.profit_bytes is not None:
            return self.profit_bytes
        return self.pages_sharing * PAGE_SIZE_BYTES


@dataclass(frozen=True)
class KsmProcess:
    """What KSM did for one process (its ``/proc/PID/ksm_stat``)."""

    merging_pages: int  # its pages that are merged now (Linux 6.1+)
    profit_bytes: int | None  # memory it saved, less bookkeeping (Linux 6.4+); None before


def ksm_setting(free_fraction: float, running: bool, params: KsmParams) -> KsmKnobs:
    """The knobs for the VMs' free share of memory now; ``running``: KSM runs now.

    Off above ``stop_above_free``, and while off until free memory falls below
    ``start_below_free``. While it runs, the pages scanned per wake-up rise linearly
    from ``pages_to_scan_min`` at the start threshold to ``pages_to_scan_max`` with
    nothing free.
    """
    threshold = params.stop_above_free if running else params.start_below_free
    if free_fraction >= threshold:
        return KsmKnobs(RUN_STOP, params.pages_to_scan_min, params.sleep_ms)
    depth = min(1.0, max(0.0, 1.0 - free_fraction / params.start_below_free))
    span = params.pages_to_scan_max - params.pages_to_scan_min
    return KsmKnobs(RUN_RUN, params.pages_to_scan_min + round(span * depth), params.sleep_ms)


def parse_ksm_stat(text: str) -> KsmProcess:
    """``/proc/PID/ksm_stat``: lines of ``name value``; fields a kernel lacks are 0/None."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        number = _integer(value.strip())
        if number is not None:
            values[name] = number
    return KsmProcess(
        merging_pages=max(0, values.get("ksm_merging_pages", 0)),
        profit_bytes=values.get("ksm_process_profit"),
    )


def _integer(text: str) -> int | None:
    """A knob's or statistic's integer; None for anything else (``ksm_mergeable: no``).
    Profits may be negative: bookkeeping can cost more than merging saved."""
    if not text or len(text) > _MAX_KNOB_CHARS:
        return None
    digits = text.removeprefix("-")
    return int(text) if digits.isdigit() else None


class SysKernelKsm:
    """The kernel's KSM knobs and totals under ``root`` (``/sys/kernel/mm/ksm``)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else KSM_ROOT

    def available(self) -> bool:
        """Whether this kernel has KSM (the ``run`` knob exists)."""
        return (self.root / "run").exists()

    def knobs(self) -> KsmKnobs:
        return KsmKnobs(
            run=self._read("run"),
            pages_to_scan=self._read("pages_to_scan"),
            sleep_ms=self._read("sleep_millisecs"),
        )

    def set_knobs(self, knobs: KsmKnobs) -> None:
        """Write the scan rate, then ``run`` (so KSM starts at the new rate).
        Raises FatalBackendError where the host refuses (not root, read-only /sys)."""
        self._write("pages_to_scan", knobs.pages_to_scan)
        self._write("sleep_millisecs", knobs.sleep_ms)
        self._write("run", knobs.run)

    def totals(self) -> KsmTotals:
        profit = self.root / "general_profit"
        return KsmTotals(
            pages_shared=self._read("pages_shared"),
            pages_sharing=self._read("pages_sharing"),
            full_scans=self._read("full_scans"),
            profit_bytes=self._read("general_profit") if profit.exists() else None,
        )

    def _read(self, name: str) -> int:
        path = self.root / name
        try:
            text = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise BackendError(f"cannot read {path}: {exc}") from exc
        value = _integer(text)
        if value is None:
            raise BackendError(f"{path}: not a number: {text[:_MAX_KNOB_CHARS]!r}")
        return value

    def _write(self, name: str, value: int) -> None:
        path = self.root / name
        try:
            path.write_text(f"{value}\n", encoding="ascii")
        except OSError as exc:
            raise FatalBackendError(f"cannot write {path}: {exc}") from exc


__all__ = [
    "KSM_ROOT",
    "RUN_RUN",
    "RUN_STOP",
    "KsmKnobs",
    "KsmParams",
    "KsmProcess",
    "KsmTotals",
    "SysKernelKsm",
    "ksm_setting",
    "parse_ksm_stat",
]
