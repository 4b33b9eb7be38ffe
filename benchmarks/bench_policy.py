"""How long the default policy's decide takes for a 1000-guest host.

Run: ``python benchmarks/bench_policy.py``. Prints the median and 99th percentile of
``RUNS`` timed decisions and writes them to ``benchmarks/results/policy_decide.json``.
The goal is 5 ms: a scheduler period is 1 s, and deciding must stay a rounding error
of it even on a large host.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Final

import numpy as np

from balloonist.model import GuestSample, GuestSpec, GuestView, HostSample, HostState, Snapshot
from balloonist.policy import DEFAULT_POLICY
from balloonist.policy.registry import make_policy
from balloonist.policy.shares import DEFAULT_TAX_RATE
from balloonist.units import GIB, MIB, PAGE_SIZE_BYTES

GUESTS: Final = 1000
RUNS: Final = 200  # enough for a stable p99 (the two slowest runs)
WARMUP_RUNS: Final = 10  # first calls pay for imports and numpy's caches
GOAL_MS: Final = 5.0
SEED: Final = 2024  # same snapshot every run, so results are comparable
RESULT_PATH: Final = Path(__file__).parent / "results" / "policy_decide.json"


def build_snapshot(guests: int, seed: int) -> Snapshot:
    """Guests of 256 MiB..16 GiB, varied shares, reservations, limits and working sets,
    on a host with a third of their configured memory (heavily overcommitted)."""
    rng = np.random.default_rng(seed)
    views: list[GuestView] = []
    for i in range(guests):
        memory = int(rng.integers(256, 16 * 1024)) * MIB
        pages = memory // PAGE_SIZE_BYTES
        limit = int(rng.integers(pages // 2, pages + 1)) * PAGE_SIZE_BYTES
        minimum = int(rng.integers(0, pages // 8 + 1)) * PAGE_SIZE_BYTES
        spec = GuestSpec(
            name=f"vm{i:04d}",
            memory_bytes=memory,
            min_bytes=minimum,
            max_bytes=limit,
            shares=int(rng.choice([500, 1000, 2000, 4000])),
            balloon=bool(rng.random() < 0.9),
        )
        register = int(rng.integers(0, pages // 4 + 1)) * PAGE_SIZE_BYTES
        sample = GuestSample(spec.name, memory - register, register, register)
        views.append(GuestView(spec, sample, int(rng.integers(0, memory))))
    host_memory = sum(v.spec.memory_bytes for v in views) // 3 // GIB * GIB
    host = HostSample(0.0, host_memory, host_memory // 50, 0, 0, HostState.SOFT)
    return Snapshot(0.0, 1.0, host, tuple(views))


def main() -> None:
    snapshot = build_snapshot(GUESTS, SEED)
    policy = make_policy(DEFAULT_POLICY, tax_rate=DEFAULT_TAX_RATE)
    for _ in range(WARMUP_RUNS):
        policy.decide(snapshot)
    times_ms: list[float] = []
    for _ in range(RUNS):
        start = time.perf_counter_ns()
        policy.decide(snapshot)
        times_ms.append((time.perf_counter_ns() - start) / 1e6)
    median_ms = statistics.median(times_ms)
    p99_ms = float(np.percentile(times_ms, 99))
    result = {
        "benchmark": "policy_decide",
        "policy": policy.name,
        "guests": GUESTS,
        "runs": RUNS,
        "median_ms": round(median_ms, 3),
        "p99_ms": round(p99_ms, 3),
        "min_ms": round(min(times_ms), 3),
        "max_ms": round(max(times_ms), 3),
        "goal_ms": GOAL_MS,
        "meets_goal": p99_ms < GOAL_MS,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": {
            "arch": platform.machine(),
            "processor": platform.processor() or None,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    RESULT_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULT_PATH.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(
        f"{policy.name}: decide, {GUESTS} guests, {RUNS} runs: "
        f"median {median_ms:.2f} ms, p99 {p99_ms:.2f} ms "
        f"(goal p99 < {GOAL_MS:.0f} ms: {'met' if p99_ms < GOAL_MS else 'not met'})"
        f" -> {RESULT_PATH}"
    )


if __name__ == "__main__":
    main()
