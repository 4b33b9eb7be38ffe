"""``balloonist demo-vm``: three real guests under the daemon, memory moving live.

Three 384 MiB test guests share a 700 MiB budget. "busy" grows its working set from
40 to 240 MiB from 30 s on, at 10 MiB/s; "build" fills 200 MiB and drops to 10 MiB at 20 s;
"quiet" uses 20 MiB throughout. The daemon balloons the idle guests' memory back and
hands it to busy. One line per second (or a live table at a terminal), then a PNG of
each guest's memory over time. The guests are stopped at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from matplotlib.figure import Figure
from rich.console import Console
from rich.live import Live
from rich.table import Table

from balloonist.daemon.service import Daemon, DaemonConfig
from balloonist.qemu import launcher
from balloonist.qemu.assets import default_cache_dir, ensure_guest_assets
from balloonist.report import write_png_atomic
from balloonist.units import MIB, format_size

#: (name, touchmem schedule, growth in MiB/s; 0 = at once)
GUESTS = (("busy", "40@0,240@30", 10), ("build", "200@0,10@20", 0), ("quiet", "20@0", 0))
GUEST_MIB = 384
BUDGET = "700MiB"
DURATION_S = 90.0


@dataclass
class _Trace:
    time_s: list[float] = field(default_factory=list)
    actual: dict[str, list[float]] = field(default_factory=dict)
    rate: dict[str, list[float]] = field(default_factory=dict)


def _work_rate(record: launcher.VMRecord) -> float:
    """The guest's last reported pages written per second, or 0."""
    if record.serial_log is None:
        return 0.0
    try:
        text = Path(record.serial_log).read_text(errors="replace")
    except OSError:
        return 0.0
    found = re.findall(r"BALLOONIST-WORK .*pages_per_s=(\d+)", text)
    return float(found[-1]) if found else 0.0


def run_vm_demo(
    out: Path, *, accel: launcher.Accel, live: bool, stdout: TextIO, duration_s: float = DURATION_S
) -> Path:
    cache = Path(os.environ.get("BALLOONIST_GUEST_ASSETS") or default_cache_dir())
    assets = ensure_guest_assets(cache, progress=lambda m: print(m, file=stdout, flush=True))
    state = launcher.StateDir(Path(tempfile.mkdtemp(prefix="bn-demo-", dir="/tmp")))
    trace = _Trace()
    try:
        for name, work, grow in GUESTS:
            print(f"booting {name} ({accel}) ...", file=stdout, flush=True)
            launcher.start_vm(
                state,
                assets.start_request(
                    name, GUEST_MIB * MIB, work=work, grow_mib_s=grow, accel=accel,
                    min_bytes=64 * MIB,
                ),
            )  # fmt: skip
        daemon = Daemon(DaemonConfig.model_validate({"daemon": {"budget": BUDGET}}), state)
        records = {name: state.load(name) for name, _, _ in GUESTS}
        start = time.monotonic()
        console = Console(file=stdout)
        with Live(console=console, auto_refresh=False) if live else _NoLive() as view:
            while (now := time.monotonic() - start) < duration_s:
                daemon.step()
                trace.time_s.append(now)
                for name, record in records.items():
                    seen = daemon.hv.view(name)
                    held = (seen.actual_bytes if seen is not None else None) or 0
                    trace.actual.setdefault(name, []).append(held / MIB)
                    trace.rate.setdefault(name, []).append(_work_rate(record))
                _show(view, console, trace, live)
                daemon.idle(max(0.0, 1.0 - (time.monotonic() - start - now)))
        daemon.hv.close()
    finally:
        for name in state.names():
            launcher.stop_vm(state, name)
        shutil.rmtree(state.root, ignore_errors=True)
    return _plot(trace, out / "demo-vm.png")


class _NoLive:
    def __enter__(self) -> _NoLive:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, *_: object, **__: object) -> None:
        return None


def _show(view: Live | _NoLive, console: Console, trace: _Trace, live: bool) -> None:
    t = trace.time_s[-1]
    if not live:
        parts = [f"{n} {trace.actual[n][-1]:.0f}MiB" for n in trace.actual]
        console.print(f"t={t:5.1f}s  " + "  ".join(parts), highlight=False)
        return
    table = Table(title=f"balloonist demo-vm: 3 guests, budget {BUDGET}, t = {t:.0f} s")
    for column in ("guest", "memory held", "pages written/s", ""):
        table.add_column(column, justify="right" if column != "" else "left")
    for name, values in trace.actual.items():
        bar = "█" * int(values[-1] / GUEST_MIB * 30)
        table.add_row(name, format_size(int(values[-1] * MIB)), f"{trace.rate[name][-1]:,.0f}", bar)
    assert isinstance(view, Live)
    view.update(table, refresh=True)


def _plot(trace: _Trace, path: Path) -> Path:
    fig = Figure(figsize=(10, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    for name, values in trace.actual.items():
        top.plot(trace.time_s, values, label=name, linewidth=2)
        bottom.plot(trace.time_s, [r / 1e6 for r in trace.rate[name]], label=name)
    top.set_ylabel("memory held (MiB)")
    top.set_title(f"three QEMU guests under balloonist daemon, budget {BUDGET}")
    top.legend()
    top.grid(alpha=0.3)
    bottom.set_ylabel("million pages written/s")
    bottom.set_xlabel("time (s)")
    bottom.grid(alpha=0.3)
    write_png_atomic(fig, path)
    return path
