"""Shared set-up of the real-VM benchmarks: guest assets, booting, serial parsing."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from balloonist.qemu import launcher
from balloonist.qemu.assets import GuestAssets, default_cache_dir, ensure_guest_assets
from balloonist.units import MIB

ROOT = Path(__file__).resolve().parents[1]
#: Accelerator for the benchmark guests: KVM where it works, else TCG (as on CI).
ACCEL: launcher.Accel = os.environ.get("BALLOONIST_ACCEL", "auto")  # type: ignore[assignment]


def assets() -> GuestAssets:
    cache = Path(os.environ.get("BALLOONIST_GUEST_ASSETS", ROOT / ".cache" / "guest"))
    if not cache.exists():
        cache = default_cache_dir()
    return ensure_guest_assets(cache, progress=print)


def state_dir() -> launcher.StateDir:
    # unix socket paths must stay short
    return launcher.StateDir(Path(tempfile.mkdtemp(prefix="bn-bench-", dir="/tmp")))


def boot(
    state: launcher.StateDir,
    name: str,
    memory_mib: int,
    work: str | None = None,
    **request_fields: Any,
) -> launcher.VMRecord:
    request = assets().start_request(
        name, memory_mib * MIB, work=work, accel=ACCEL, **request_fields
    )
    record = launcher.start_vm(state, request)
    wait_line(record, "BALLOONIST-READY", 120.0)
    return record


def lines(record: launcher.VMRecord) -> list[str]:
    assert record.serial_log is not None
    return Path(record.serial_log).read_text(errors="replace").splitlines()


def wait_line(record: launcher.VMRecord, pattern: str, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if any(re.search(pattern, line) for line in lines(record)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{record.name}: no {pattern!r} on the serial console")


_WORK_RE = re.compile(r"BALLOONIST-WORK t=(\d+) ws_mib=(\d+) .*pages_per_s=(\d+)")


def work_reports(record: launcher.VMRecord) -> list[tuple[int, int, int]]:
    """(t_s, ws_mib, pages_per_s) of every BALLOONIST-WORK line so far."""
    return [
        (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        for line in lines(record)
        if (m := _WORK_RE.search(line))
    ]


def work_rates(record: launcher.VMRecord) -> list[int]:
    """pages_per_s of every BALLOONIST-WORK line so far."""
    return [rate for _, _, rate in work_reports(record)]


def stop_all(state: launcher.StateDir) -> None:
    for name in state.names():
        launcher.stop_vm(state, name)
    shutil.rmtree(state.root, ignore_errors=True)
