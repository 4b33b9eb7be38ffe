"""The host daemon: every period, the same scheduler and policy as the simulator, over a
:class:`~balloonist.daemon.backend.Backend`: the QEMU VMs recorded in a state directory
(:class:`Daemon`, configured by ``host.toml``, see :mod:`balloonist.daemon.config`), or
a simulated host in accelerated time (:func:`sim_daemon`).

One loop (:class:`DaemonLoop`) serves both. A period:

1. applies the changes operators queued since the last one (:meth:`DaemonLoop.change_guest`,
   :meth:`DaemonLoop.change_policy`), in the loop's thread;
2. lets the backend pick up guests added or removed;
3. collects, decides and acts (:class:`~balloonist.scheduler.Scheduler`), and lets the
   backend settle (the simulator runs its guests for the period);
4. publishes a :class:`~balloonist.daemon.status.Status` (a frozen snapshot, swapped in
   by reference: servers in other threads read :meth:`DaemonLoop.status`), and keeps
   its charted figures for the last minutes (:meth:`DaemonLoop.history`);
5. writes ``daemon-state.json`` if anything changed (:mod:`balloonist.daemon.statefile`).

Between periods it waits ``wall_period_s`` from the period's start.

**Restarts.** If the daemon stops or dies, guests keep the memory they have. A daemon
started on a state directory with a valid ``daemon-state.json``:

- re-applies the live spec changes recorded there (min, max, shares), for the guests
  it still has (QEMU: also in each ``vm.json``), and the policy's live tax rate;
- QEMU: starts every guest's target where the guest is (``daemon/pacing.py``, rule 3);
  the saved targets are informational, since the guests ran on without the daemon;
- simulator: resumes the simulated clock, starts each guest with its balloon at the
  recorded size and its register at the recorded target, holds that target for the
  first period, and continues from the recorded working-set estimates
  (``daemon/sim_backend.py``).

A corrupt file is logged, set aside and never overwritten; the daemon then starts fresh.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Final

from balloonist.daemon.backend import (
    CYCLES_SKIPPED,
    UNCOOPERATIVE,
    Backend,
    GuestState,
    ResumePoint,
    changed_spec,
    merge_changes,
)
from balloonist.daemon.config import (
    DAEMON_POLICIES,
    DaemonConfig,
    budget_bytes,
    load_config,
    with_overrides,
)
from balloonist.daemon.control import GuestChange
from balloonist.daemon.history import History, HistoryPoint
from balloonist.daemon.qemu_backend import QemuBackend
from balloonist.daemon.qemu_hv import QemuHypervisor
from balloonist.daemon.statefile import (
    FORMAT,
    STATE_FILE,
    SavedChange,
    SavedEstimate,
    SavedGuest,
    SavedPolicy,
    SavedState,
    load_state,
    save_state,
)
from balloonist.daemon.status import PolicyStatus, Status, status_from_cycle
from balloonist.daemon.vm_ports import VcpuHost, VmPort
from balloonist.errors import BalloonistError, ConfigError
from balloonist.host import HostMemInfo, read_meminfo
from balloonist.model import GuestSpec
from balloonist.policy import Policy
from balloonist.policy.registry import make_policy
from balloonist.policy.workingset import EstimateState, EstimatorParams
from balloonist.qemu.launcher import StateDir, VMRecord
from balloonist.scheduler import Cycle, Scheduler
from balloonist.units import format_size

log = logging.getLogger("balloonist.daemon")

#: A period's summary is logged at most this often (wall seconds): enough to watch a
#: daemon work, not a line per period at a period of a second or less.
LOG_EVERY_S: Final = 5.0
#: Guests named in that summary; the rest are counted.
LOG_GUESTS: Final = 6


class DaemonLoop:
    """One scheduler over a backend, every period, until stopped.

    Implements :class:`~balloonist.daemon.control.Controller`: ``status()``,
    ``change_guest()`` and ``change_policy()`` may be called from any thread; everything
    else belongs to the thread that calls ``step()`` or ``run()``.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        policy_name: str,
        tax_rate: float,
        make_policy: Callable[[float], Policy],
        state_path: Path,
        scenario: str | None = None,
        estimator: EstimatorParams | None = None,
        policy: Policy | None = None,
        wall_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``make_policy(tax_rate)`` builds the policy (again, when the tax changes);
        ``policy`` replaces the first one it builds (tests)."""
        self.backend = backend
        self.state_path = state_path
        self._scenario = scenario
        self._make_policy = make_policy
        self._wall = wall_clock
        saved = load_state(state_path, backend=backend.kind, scenario=scenario)
        self._live_tax: float | None = None  # a live change of the tax rate, in effect
        if saved is not None and saved.policy.name == policy_name:
            self._live_tax = saved.policy.changed_tax_rate
        if self._live_tax is not None:
            tax_rate = self._live_tax
        self._policy = PolicyStatus(policy_name, tax_rate)
        self.scheduler = Scheduler(
            backend.hypervisor,
            policy or make_policy(tax_rate),
            period_s=backend.period_s,
            estimator=estimator,
        )
        self._lock = threading.Lock()  # guards what the Controller methods touch
        self._specs: dict[str, GuestSpec] = {}
        self._capacity_bytes = 0
        self._pending: dict[str, GuestChange] = {}
        self._pending_tax: float | None = None
        self._status: Status | None = None
        self._history = History()
        self._version = 0
        self._live: dict[str, GuestChange] = {}  # live changes in effect (persisted)
        self._periods = saved.periods if saved is not None else 0
        self._skipped = 0
        self._uncooperative: Counter[str] = Counter()
        self._was_cooperative: dict[str, bool] = {}
        self._saved = saved
        self._logged_at = -math.inf
        self._closed = False
        self._refresh_specs()
        if saved is not None:
            self._resume(saved)

    # -- the Controller ---------------------------------------------------------------

    def status(self) -> Status | None:
        return self._status

    def history(self, since_version: int = 0) -> Sequence[HistoryPoint]:
        return self._history.since(since_version)

    def change_guest(self, name: str, change: GuestChange) -> None:
        with self._lock:
            spec = self._specs.get(name)
            if spec is None:
                raise ConfigError(f"unknown guest {name!r}", where="name", field="name")
            merged = merge_changes(self._pending.get(name), change)
            updated = changed_spec(spec, merged)
            reserved = updated.min_bytes + sum(
                self._pending_spec(other).min_bytes for other in self._specs if other != name
            )
            if updated.min_bytes > spec.min_bytes and reserved > self._capacity_bytes:
                raise ConfigError(
                    f"the guests' reservations would add up to {format_size(reserved)}, more "
                    f"than the {format_size(self._capacity_bytes)} they share",
                    where="min_bytes",
                    field="min_bytes",
                )
            self._pending[name] = merged

    def change_policy(self, *, tax_rate: float) -> None:
        if (
            isinstance(tax_rate, bool)
            or not isinstance(tax_rate, int | float)
            or not 0.0 <= tax_rate < 1.0
        ):
            raise ConfigError(
                f"must be at least 0 and below 1, got {tax_rate!r}",
                where="tax_rate",
                field="tax_rate",
            )
        with self._lock:
            self._pending_tax = float(tax_rate)

    def _pending_spec(self, name: str) -> GuestSpec:
        change = self._pending.get(name)
        spec = self._specs[name]
        return spec if change is None else changed_spec(spec, change)

    # -- the loop -----------------------------------------------------------------------

    def step(self) -> Cycle | None:
        """One period (see the module docstring). Returns what the period saw and
        decided, or None if it was skipped."""
        self.backend.refresh()
        self._take_changes()
        self._refresh_specs()
        cycle: Cycle | None
        try:
            cycle = self.scheduler.step()
        except BalloonistError as exc:
            log.error("cycle skipped: %s", exc)
            self._skipped += 1
            cycle = None
        self.backend.settle()
        self._periods += 1
        self._count_uncooperative(cycle)
        self._publish(cycle)
        self._save()
        self._log_period()
        return cycle

    def idle(self, seconds: float, stop: Callable[[], bool] = lambda: False) -> None:
        """Wait between periods (QEMU: while the VMs' ports keep working)."""
        self.backend.wait(seconds, stop)

    def run(self, stop: threading.Event) -> None:
        """Periods until ``stop`` is set; then close."""
        period = self.backend.wall_period_s
        try:
            while not stop.is_set():
                started = self._wall()
                self.step()
                self.idle(max(0.0, period - (self._wall() - started)), stop.is_set)
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.backend.close()
        if self.backend.kind == "sim":
            log.info("stopped; a daemon started on %s resumes the simulated host", self.state_path)
        else:
            log.info("stopped; guests keep the memory they have")

    # -- inside a period ------------------------------------------------------------------

    def _refresh_specs(self) -> None:
        specs = {s.name: s for s in self.backend.configured_specs()}
        capacity = self.backend.capacity_bytes()
        for gone in set(self._live) - set(specs):
            del self._live[gone]
        with self._lock:
            self._specs = specs
            self._capacity_bytes = capacity
            for gone in set(self._pending) - set(specs):
                log.warning("%s: no longer managed; its queued change is dropped", gone)
                del self._pending[gone]

    def _take_changes(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            tax, self._pending_tax = self._pending_tax, None
        for name, change in pending.items():
            self._apply_change(name, change, why="live change")
        if tax is not None:
            self.scheduler.policy = self._make_policy(tax)
            self._policy = replace(self._policy, tax_rate=tax)
            self._live_tax = tax
            log.info("policy %s: tax rate %.2f (live change)", self._policy.name, tax)

    def _apply_change(self, name: str, change: GuestChange, *, why: str) -> bool:
        spec = next((s for s in self.backend.configured_specs() if s.name == name), None)
        try:
            if spec is None:
                raise ConfigError("no longer managed")
            updated = changed_spec(spec, change)
            self.backend.apply_change(name, change)
        except BalloonistError as exc:
            log.error("%s: change not applied: %s", name, exc)
            return False
        self._live[name] = merge_changes(self._live.get(name), change)
        cpu = updated.cpu
        log.info(
            "%s: min %s, max %s, shares %d%s (%s)",
            name,
            format_size(updated.min_bytes),
            format_size(updated.limit_bytes),
            updated.shares,
            ""
            if cpu is None
            else f"; cpu_min {cpu.min_cpus}, cpu_max {cpu.limit_cpus}, cpu_shares {cpu.shares}",
            why,
        )
        return True

    def _count_uncooperative(self, cycle: Cycle | None) -> None:
        if cycle is None:
            return
        for view in cycle.snapshot.guests:
            cooperative = view.sample.cooperative
            if not cooperative and self._was_cooperative.get(view.name, True):
                self._uncooperative[view.name] += 1
            self._was_cooperative[view.name] = cooperative

    def _counters(self) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        totals = {
            CYCLES_SKIPPED: self._skipped,
            UNCOOPERATIVE: sum(self._uncooperative.values()),
            **self.backend.counters(),
        }
        per_guest = {
            name: {UNCOOPERATIVE: self._uncooperative[name], **counters}
            for name, counters in self.backend.guest_counters().items()
        }
        return totals, per_guest

    def _publish(self, cycle: Cycle | None) -> None:
        counters, guest_counters = self._counters()
        if cycle is not None:
            status = status_from_cycle(
                cycle,
                version=self._version + 1,
                policy=self._policy,
                counters=counters,
                guest_counters=guest_counters,
            )
        elif self._status is not None:
            status = replace(
                self._status, version=self._version + 1, policy=self._policy, counters=counters
            )
        else:
            return  # nothing seen yet
        self._version += 1
        self._status = status  # one reference swap: readers see the old or the new
        self._history.record(status)

    def _log_period(self) -> None:
        now = time.monotonic()
        status = self._status
        if status is None or now - self._logged_at < LOG_EVERY_S:
            return
        self._logged_at = now
        guests = ", ".join(
            f"{g.name} {format_size(g.allocated_bytes)} "
            f"(target {format_size(g.allocation_target_bytes)})"
            for g in status.guests[:LOG_GUESTS]
        )
        more = len(status.guests) - LOG_GUESTS
        log.info(
            "period %d, t=%.0fs: host %s, free %s; %s%s",
            self._periods,
            status.time_s,
            status.host.state,
            format_size(status.host.free_bytes),
            guests or "no guests",
            f", +{more} more" if more > 0 else "",
        )

    # -- the state file -------------------------------------------------------------------

    def saved_state(self) -> SavedState:
        """What the state file records now."""
        states = self.backend.guest_states()
        estimates = self.scheduler.estimates() if self.backend.resumes_estimates else {}
        guests = {}
        for spec in self.backend.configured_specs():
            state = states.get(spec.name)
            live = self._live.get(spec.name) or GuestChange()
            estimate = estimates.get(spec.name)
            guests[spec.name] = SavedGuest(
                memory_bytes=spec.memory_bytes,
                min_bytes=spec.min_bytes,
                max_bytes=spec.limit_bytes,
                shares=spec.shares,
                changed=SavedChange.model_validate(dataclasses.asdict(live)),
                allocated_bytes=state.allocated_bytes if state else None,
                balloon_bytes=state.balloon_bytes if state else None,
                balloon_target_bytes=state.balloon_target_bytes if state else None,
                estimate=(
                    SavedEstimate(
                        fast_bytes=estimate[0].fast_bytes,
                        slow_bytes=estimate[0].slow_bytes,
                        observed_at_s=estimate[1],
                    )
                    if estimate is not None
                    else None
                ),
            )
        return SavedState(
            format=FORMAT,
            backend=self.backend.kind,
            scenario=self._scenario,
            periods=self._periods,
            time_s=self.backend.time_s(),
            saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            policy=SavedPolicy(
                name=self._policy.name,
                tax_rate=self._policy.tax_rate,
                changed_tax_rate=self._live_tax,
            ),
            guests=guests,
        )

    def _save(self) -> None:
        state = self.saved_state()
        if state.same_content(self._saved):
            return
        try:
            save_state(self.state_path, state)
        except OSError as exc:
            log.error("%s: cannot write the daemon's state: %s", self.state_path, exc)
            return
        self._saved = state

    def _resume(self, saved: SavedState) -> None:
        specs = {s.name: s for s in self.backend.configured_specs()}
        guests: dict[str, GuestState] = {}
        for name, guest in saved.guests.items():
            spec = specs.get(name)
            if spec is None:
                log.info("%s: in the saved state but not managed now; left out", name)
                continue
            if spec.memory_bytes != guest.memory_bytes:
                log.warning(
                    "%s: memory is %s now, %s when saved; its saved state is left out",
                    name,
                    format_size(spec.memory_bytes),
                    format_size(guest.memory_bytes),
                )
                continue
            change = GuestChange(**guest.changed.model_dump())
            if change != GuestChange():
                self._apply_change(name, change, why="saved live change")
            if guest.estimate is not None and self.backend.resumes_estimates:
                self.scheduler.restore_estimate(
                    name,
                    EstimateState(guest.estimate.fast_bytes, guest.estimate.slow_bytes),
                    guest.estimate.observed_at_s,
                )
            if guest.balloon_bytes is not None and guest.allocated_bytes is not None:
                guests[name] = GuestState(
                    allocated_bytes=guest.allocated_bytes,
                    balloon_bytes=guest.balloon_bytes,
                    balloon_target_bytes=guest.balloon_target_bytes,
                )
        self.backend.resume(ResumePoint(time_s=saved.time_s, guests=guests))
        self._refresh_specs()
        log.info(
            "resumed from %s: period %d, %d guest(s), policy %s tax %.2f",
            self.state_path,
            saved.periods,
            len(guests),
            self._policy.name,
            self._policy.tax_rate,
        )


class Daemon(DaemonLoop):
    """The daemon over the QEMU VMs recorded in a state directory.

    Its state file is ``daemon-state.json`` in the state directory's root.
    """

    def __init__(
        self,
        config: DaemonConfig,
        state: StateDir,
        *,
        clock: Callable[[], float] = time.monotonic,
        meminfo: Callable[[], HostMemInfo] = read_meminfo,
        connector: Callable[[VMRecord], VmPort] | None = None,
        vcpu_host: VcpuHost | None = None,
        on_target: Callable[[str, int], None] | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.config = config
        self.state = state
        backend = QemuBackend(
            config,
            state,
            clock=clock,
            meminfo=meminfo,
            connector=connector,
            vcpu_host=vcpu_host,
            on_target=on_target,
        )
        self.hv: QemuHypervisor = backend.hv
        state.root.mkdir(parents=True, exist_ok=True)
        name = config.policy.name
        super().__init__(
            backend,
            policy_name=name,
            tax_rate=config.policy.tax_rate,
            make_policy=lambda tax: make_policy(name, tax_rate=tax),
            state_path=state.root / STATE_FILE,
            policy=policy,
            wall_clock=clock,
        )
        log.info(
            "budget %s for %d VM(s), policy %s, period %.1f s",
            format_size(self.hv.budget_bytes),
            len(self.hv.managed()),
            name,
            config.daemon.period_s,
        )


__all__ = [
    "DAEMON_POLICIES",
    "Daemon",
    "DaemonConfig",
    "DaemonLoop",
    "budget_bytes",
    "load_config",
    "with_overrides",
]
