"""API latency and daemon CPU with 200 simulated guests at a 1 s period.

Run: ``python benchmarks/bench_api.py [--seconds N]``. Starts ``balloonist daemon
--sim`` as a subprocess on a generated scenario of ``GUESTS`` small guests (64 MiB
each; a third idle, a third with a uniform working set, a third that builds a data set
and then goes quiet) on a host with 60 % of their configured memory, at ``--speed 1``.
Once ``GET /v1/guests`` answers with every guest and the simulated clock has passed
``WARMUP_SIM_S`` (the workloads' ramps and phase changes are over), it measures two
kinds of window in the same daemon, ``--seconds`` of each, taken in ``CHUNKS``
alternating chunks so that any slow drift in the simulation weighs on both alike:

1. **quiet**: no API requests; the daemon's CPU share is the simulator (all 200
   simulated guests run inside the daemon process), the policy and the period's
   bookkeeping;
2. **loaded**: ``GET /v1/guests`` over the unix socket at ``RATE_HZ``, each request's
   latency recorded (request sent to last byte of the body, one kept-alive connection).

The daemon's CPU time is read from ``/proc/PID/stat`` (utime + stime, all threads) at
each chunk's start and end; its share is CPU seconds over wall seconds, of one core.
The difference between the two windows is what serving the API costs. Periods per
wall second come from the status version; below ``1 / period_s`` would mean the
simulator cannot keep 200 guests in real time (it is printed as ``real time: no``).
Writes ``benchmarks/results/api_latency.json``.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import numpy as np

from _common import write_result

GUESTS: Final = 200
GUEST_MIB: Final = 64
HOST_SHARE: Final = 0.6  # host memory / guests' configured memory: overcommitted
PERIOD_S: Final = 1.0
RATE_HZ: Final = 10.0
RUN_S: Final = 60.0
WARMUP_SIM_S: Final = 40.0  # simulated time before measuring: ramps and phases done
CHUNKS: Final = 6  # each window is measured in this many chunks, quiet and loaded in turn
READY_TIMEOUT_S: Final = 180.0  # start-up: imports, numba compilation, first period
STOP_TIMEOUT_S: Final = 30.0
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def scenario_toml(guests: int) -> str:
    host_mib = int(guests * GUEST_MIB * HOST_SHARE)
    lines = [
        'name = "bench-api"',
        f'description = "{guests} guests of {GUEST_MIB}MiB on a {host_mib}MiB host"',
        "",
        "[host]",
        f'memory = "{host_mib}MiB"',
        'swap = "4GiB"',
        "",
        "[sim]",
        "duration_s = 86400.0",
        f"period_s = {PERIOD_S}",
        "seed = 1",
        "",
    ]
    workloads = (
        '{ kind = "idle" }',
        '{ kind = "uniform", working_set = "32MiB", ramp_s = 10 }',
        '{ kind = "phases", phases = [ '
        '{ at_s = 0.0, workload = { kind = "scan", working_set = "40MiB", ramp_s = 5 } }, '
        '{ at_s = 10.0, workload = { kind = "idle" } } ] }',
    )
    for i in range(guests):
        lines += [
            "[[guests]]",
            f'name = "vm{i:03d}"',
            f'memory = "{GUEST_MIB}MiB"',
            f"workload = {workloads[i % len(workloads)]}",
            "",
        ]
    return "\n".join(lines)


def cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process (every thread), in clock ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; fields[0] is state
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def wait_ready(client: httpx.Client, proc: subprocess.Popen[bytes], log: Path) -> int:
    """Poll until GET /v1/guests lists every guest; then the status version."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"daemon exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            response = client.get("/v1/guests")
        except httpx.TransportError:
            response = None
        if response is not None and response.status_code == 200:
            body = response.json()
            if len(body["guests"]) == GUESTS:
                return int(body["version"])
        time.sleep(0.2)
    sys.exit(f"daemon not ready after {READY_TIMEOUT_S:g} s:\n{log.read_text()[-3000:]}")


def status(client: httpx.Client) -> tuple[int, float]:
    body = client.get("/v1/status").raise_for_status().json()
    return int(body["version"]), float(body["time_s"])


@dataclass
class Window:
    """What one kind of window (quiet or loaded) adds up to over its chunks."""

    wall_s: float = 0.0
    daemon_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    periods: int = 0
    sim_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)

    def measure(
        self, client: httpx.Client, pid: int, seconds: float, rate_hz: float | None
    ) -> None:
        """One chunk: the daemon's CPU and periods, and (with a rate) the latencies
        of GET /v1/guests issued on a fixed schedule."""
        version0, sim0 = status(client)
        ticks0, wall0, own0 = cpu_ticks(pid), time.monotonic(), time.process_time()
        end = wall0 + seconds
        n = 0
        while rate_hz is not None and (due := wall0 + n / rate_hz) < end:
            if (ahead := due - time.monotonic()) > 0:
                time.sleep(ahead)  # behind schedule: send at once, don't bunch up later
            start = time.perf_counter_ns()
            response = client.get("/v1/guests")
            self.latencies_ms.append((time.perf_counter_ns() - start) / 1e6)
            if response.status_code != 200:
                sys.exit(f"GET /v1/guests: {response.status_code} {response.text[:200]}")
            n += 1
        time.sleep(max(0.0, end - time.monotonic()))
        ticks1, wall1, own1 = cpu_ticks(pid), time.monotonic(), time.process_time()
        version1, sim1 = status(client)
        self.wall_s += wall1 - wall0
        self.daemon_cpu_s += (ticks1 - ticks0) / CLK_TCK
        self.client_cpu_s += own1 - own0
        self.periods += version1 - version0
        self.sim_s += sim1 - sim0

    def figures(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "wall_s": round(self.wall_s, 2),
            "daemon_cpu_s": round(self.daemon_cpu_s, 2),
            "daemon_cpu_share": round(self.daemon_cpu_s / self.wall_s, 4),
            "client_cpu_s": round(self.client_cpu_s, 2),
            "periods": self.periods,
            "periods_per_s": round(self.periods / self.wall_s, 3),
            "sim_s_per_wall_s": round(self.sim_s / self.wall_s, 3),
        }
        if lat := self.latencies_ms:
            result |= {
                "requests": len(lat),
                "rate_hz": RATE_HZ,
                "p50_ms": round(statistics.median(lat), 2),
                "p99_ms": round(float(np.percentile(lat, 99)), 2),
                "max_ms": round(max(lat), 2),
                "mean_ms": round(statistics.fmean(lat), 2),
            }
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=RUN_S, help="each window's length")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        root = Path(tmp)
        scenario, log, sock = root / "scenario.toml", root / "daemon.log", root / "api.sock"
        scenario.write_text(scenario_toml(GUESTS), encoding="utf-8")
        command = [sys.executable, "-m", "balloonist", "daemon", "--sim", str(scenario)]
        command += ["--speed", "1", "--state-dir", str(root / "state"), "--api-socket", str(sock)]
        with log.open("wb") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        transport = httpx.HTTPTransport(uds=str(sock))
        try:
            with httpx.Client(transport=transport, base_url="http://balloonist", timeout=30) as c:
                started = time.monotonic()
                first = wait_ready(c, proc, log)
                ready_s = time.monotonic() - started
                while (now := status(c))[0] < first + 1 or now[1] < WARMUP_SIM_S:
                    if time.monotonic() - started > READY_TIMEOUT_S + 2 * WARMUP_SIM_S:
                        sys.exit(f"periods too slow to warm up:\n{log.read_text()[-3000:]}")
                    time.sleep(0.5)
                quiet_w, loaded_w = Window(), Window()
                for _ in range(CHUNKS):  # alternate, so slow drifts hit both alike
                    quiet_w.measure(c, proc.pid, args.seconds / CHUNKS, None)
                    loaded_w.measure(c, proc.pid, args.seconds / CHUNKS, RATE_HZ)
                quiet, loaded = quiet_w.figures(), loaded_w.figures()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                print("daemon did not stop on SIGTERM; killed", file=sys.stderr)
    real_time = min(quiet["periods_per_s"], loaded["periods_per_s"]) >= 0.97 / PERIOD_S
    api_share = loaded["daemon_cpu_share"] - quiet["daemon_cpu_share"]
    print(f"{GUESTS} simulated guests of {GUEST_MIB} MiB, period {PERIOD_S:g} s, speed 1")
    print(f"ready (every guest listed) after {ready_s:.1f} s; exit code {proc.returncode}")
    print(
        f"GET /v1/guests x{loaded['requests']} at {RATE_HZ:g}/s: p50 {loaded['p50_ms']} ms, "
        f"p99 {loaded['p99_ms']} ms, max {loaded['max_ms']} ms"
    )
    for name, w in (("quiet ", quiet), ("loaded", loaded)):
        print(
            f"{name}: daemon {w['daemon_cpu_share']:.1%} of one core over {w['wall_s']:.0f} s, "
            f"{w['periods_per_s']:.2f} periods/s, {w['sim_s_per_wall_s']:.2f} sim s per wall s"
        )
    noise = " (negative: below the noise of the simulator's own CPU)" if api_share < 0 else ""
    print(f"API's share (loaded - quiet): {api_share:.1%} of one core{noise}")
    print(f"real time: {'yes' if real_time else 'NO: a period takes longer than its length'}")
    path = write_result(
        "api_latency",
        {
            "guests": GUESTS,
            "guest_memory_mib": GUEST_MIB,
            "host_memory_mib": int(GUESTS * GUEST_MIB * HOST_SHARE),
            "period_s": PERIOD_S,
            "speed": 1.0,
            "workloads": "idle / uniform 32MiB / scan 40MiB then idle, in turn",
            "ready_s": round(ready_s, 1),
            "real_time": real_time,
            "p50_ms": loaded["p50_ms"],
            "p99_ms": loaded["p99_ms"],
            "max_ms": loaded["max_ms"],
            "requests": loaded["requests"],
            "daemon_cpu_share": loaded["daemon_cpu_share"],
            "daemon_cpu_share_without_requests": quiet["daemon_cpu_share"],
            "api_cpu_share": round(api_share, 4),
            "periods_per_s": loaded["periods_per_s"],
            "quiet": quiet,
            "loaded": loaded,
        },
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
