"""The daemon's backend over a simulated host (``balloonist daemon --sim``).

The scenario's guests are the VMs. After each period's targets are applied, the
simulated guests run for one period of simulated time (``settle``); the daemon then
waits ``period_s / speed`` of wall time from the period's start, so ``--speed 10``
runs ten simulated seconds per wall-clock second (or as fast as the simulator
manages, if that is slower).

**Resuming.** The simulated guests live in the daemon's process, so a restarted
daemon boots them afresh: each starts with its balloon at the size the state file
recorded, pinned through the same driver, kernel and VMM paths as any inflation, its
balloon register at the recorded target, and the simulated clock where it was (the
workloads' phases continue). For the first period after a resume the register is held
at the recorded target whatever the policy decides (the QEMU pacer's rule 3: a restart
moves nothing), so no balloon moves by more than one rate-limited driver step. What
the guests had paged in is not recorded: they fault their working sets back in.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Final

from balloonist.daemon.backend import (
    BackendKind,
    GuestState,
    ResumePoint,
    changed_spec,
)
from balloonist.daemon.control import GuestChange
from balloonist.daemon.counters import Counts, FailureCounter
from balloonist.daemon.ksm_control import KsmStatus
from balloonist.daemon.service import DaemonLoop
from balloonist.daemon.statefile import STATE_FILE
from balloonist.errors import ConfigError
from balloonist.model import Decision, GuestSample, GuestSpec, GuestTarget, HostReading
from balloonist.policy import Policy
from balloonist.qemu import launcher
from balloonist.sim import engine as e
from balloonist.sim.machine import SimMachine
from balloonist.sim.runner import build_policy
from balloonist.sim.scenario import Scenario
from balloonist.units import PAGE_SIZE_BYTES, bytes_to_pages_floor, format_size

log = logging.getLogger("balloonist.daemon")

#: Fastest accepted speed-up: beyond it a 1 s period gets under a millisecond of wall
#: time, and the simulator's own computing sets the pace anyway.
MAX_SPEED: Final = 1000.0
#: How often ``wait`` checks whether to stop, wall seconds.
WAIT_SLICE_S: Final = 0.05


def check_speed(speed: float) -> float:
    if not 0.0 < speed <= MAX_SPEED:  # also refuses NaN
        raise ConfigError(
            f"must be above 0 and at most {MAX_SPEED:g}, got {speed:g}", where="--speed"
        )
    return speed


class SimBackend:
    """The scenario's simulated host, driven by the daemon in accelerated time."""

    def __init__(self, scenario: Scenario, *, speed: float = 1.0) -> None:
        self.scenario = scenario
        self.speed = check_speed(speed)
        self.machine = SimMachine(scenario)
        self._held: dict[str, int] | None = None  # registers held for the first period

    # -- the Hypervisor port (the machine's, with the hold after a resume) -------------

    def specs(self) -> Sequence[GuestSpec]:
        return self.machine.specs()

    def read_host(self) -> HostReading:
        return self.machine.read_host()

    def sample_guests(self) -> Sequence[GuestSample]:
        return self.machine.sample_guests()

    def apply(self, decision: Decision) -> None:
        held, self._held = self._held, None
        if held:
            decision = replace(
                decision,
                targets=tuple(
                    GuestTarget(t.name, t.allocation_bytes, held[t.name]) if t.name in held else t
                    for t in decision.targets
                ),
            )
        self.machine.apply(decision)

    # -- Backend --------------------------------------------------------------------------

    @property
    def kind(self) -> BackendKind:
        return "sim"

    @property
    def hypervisor(self) -> SimBackend:
        return self

    @property
    def period_s(self) -> float:
        return self.scenario.period_s

    @property
    def wall_period_s(self) -> float:
        return self.scenario.period_s / self.speed

    @property
    def resumes_estimates(self) -> bool:
        return True  # the simulated clock resumes with the daemon

    def refresh(self) -> None:
        pass  # a scenario's guests are fixed

    def settle(self) -> None:
        self.machine.advance(self.scenario.period_s)

    def wait(self, seconds: float, stop: Callable[[], bool]) -> None:
        deadline = time.monotonic() + seconds
        while not stop() and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, WAIT_SLICE_S))

    def close(self) -> None:
        pass

    def configured_specs(self) -> list[GuestSpec]:
        return list(self.machine.specs())

    def capacity_bytes(self) -> int:
        return self.machine.host_pages * PAGE_SIZE_BYTES

    def apply_change(self, name: str, change: GuestChange) -> None:
        spec = next(s for s in self.machine.specs() if s.name == name)
        self.machine.set_spec(changed_spec(spec, change))

    def time_s(self) -> float | None:
        return self.machine.time_s

    def ksm(self) -> KsmStatus | None:
        return None  # the simulator shares no pages

    def guest_states(self) -> dict[str, GuestState]:
        return {
            s.name: GuestState(
                allocated_bytes=s.allocated_bytes,
                balloon_bytes=s.balloon_bytes,
                balloon_target_bytes=s.balloon_target_bytes,
            )
            for s in self._peek_samples()
        }

    def _peek_samples(self) -> list[GuestSample]:
        # sample_guests() consumes closed sampling windows; read the sizes directly.
        return [
            GuestSample(
                name=m.spec.name,
                allocated_bytes=m.mapped_pages * PAGE_SIZE_BYTES,
                balloon_bytes=int(m.st[e.S_BALLOON]) * PAGE_SIZE_BYTES,
                balloon_target_bytes=m.register_pages * PAGE_SIZE_BYTES,
            )
            for m in self.machine.guests
        ]

    def resume(self, point: ResumePoint) -> None:
        if point.time_s is not None:
            self.machine.time_s = point.time_s
        held: dict[str, int] = {}
        for name, saved in point.guests.items():
            target = saved.balloon_target_bytes
            if target is None:
                target = saved.balloon_bytes
            got = self.machine.restore_balloon(
                name,
                balloon_pages=bytes_to_pages_floor(saved.balloon_bytes),
                register_pages=bytes_to_pages_floor(target),
            )
            m = next(m for m in self.machine.guests if m.spec.name == name)
            held[name] = m.register_pages * PAGE_SIZE_BYTES
            log.info(
                "%s: balloon restored at %s (saved %s), target %s",
                name,
                format_size(got * PAGE_SIZE_BYTES),
                format_size(saved.balloon_bytes),
                format_size(held[name]),
            )
        self._held = held

    def counters(self) -> Counts:
        failures = FailureCounter.BALLOON_FAILURES
        return {failures: sum(c[failures] for c in self.guest_counters().values())}

    def guest_counters(self) -> dict[str, Counts]:
        return {
            m.spec.name: {FailureCounter.BALLOON_FAILURES: driver.rate.failures if driver else 0}
            for m, driver in zip(self.machine.guests, self.machine.drivers, strict=True)
        }


def default_sim_state_dir(scenario: Scenario) -> Path:
    """Where a simulated daemon keeps its state by default: one directory per scenario
    name, beside the QEMU daemon's (``launcher.default_state_dir``)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", scenario.name)[:64].lstrip(".") or "scenario"
    return launcher.default_state_dir() / "sim" / safe


def sim_daemon(
    scenario: Scenario,
    *,
    state_dir: Path,
    speed: float = 1.0,
    policy_name: str | None = None,
) -> DaemonLoop:
    """The daemon's loop over ``scenario``'s simulated host, resuming from
    ``state_dir/daemon-state.json`` if it is there (see ``daemon/service.py``)."""
    backend = SimBackend(scenario, speed=speed)
    name = policy_name or scenario.policy_name

    def make(tax_rate: float) -> Policy:
        return build_policy(replace(scenario, tax_rate=tax_rate), name)

    state_dir.mkdir(parents=True, exist_ok=True)
    log.info(
        "simulated host %r: %s, %d guest(s), policy %s, period %g s at %gx (state in %s)",
        scenario.name,
        format_size(scenario.host_memory_bytes),
        len(scenario.guests),
        name,
        scenario.period_s,
        backend.speed,
        state_dir,
    )
    return DaemonLoop(
        backend,
        policy_name=name,
        tax_rate=scenario.tax_rate,
        make_policy=make,
        state_path=state_dir / STATE_FILE,
        scenario=scenario.name,
        estimator=scenario.estimator,
    )


__all__ = ["MAX_SPEED", "SimBackend", "check_speed", "default_sim_state_dir", "sim_daemon"]
