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

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from balloonist.daemon.backend import (
    Backend,
    GuestState,
    ResumePoint,
    changed_spec,
    merge_changes,
)
from balloonist.daemon.board import StatusBoard
from balloonist.daemon.changes import ChangeQueue
from balloonist.daemon.config import (
    DAEMON_POLICIES,
    DaemonConfig,
    budget_bytes,
    load_config,
    with_overrides,
)
from balloonist.daemon.control import GuestChange
from balloonist.daemon.history import HistoryPoint
from balloonist.daemon.host_reclaim import CgroupHost
from balloonist.daemon.ksm_control import KsmClaim, KsmHost
from balloonist.daemon.qemu_backend import QemuBackend
from balloonist.daemon.qemu_hv import QemuHypervisor
from balloonist.daemon.statefile import (
    FORMAT,
    STATE_FILE,
    SavedPolicy,
    SavedState,
    load_state,
    save_state,
    saved_guest,
)
from balloonist.daemon.status import PolicyStatus, Status
from balloonist.daemon.vm_ports import VcpuHost, VmMemoryHost, VmPort
from balloonist.daemon.vm_source import StateDirVms, VmSource
from balloonist.errors import BalloonistError, ConfigError
from balloonist.host import HostMemInfo, read_meminfo
from balloonist.policy import Policy
from balloonist.policy.registry import make_policy
from balloonist.policy.workingset import EstimateState, EstimatorParams
from balloonist.qemu.launcher import StateDir, VMRecord
from balloonist.scheduler import Cycle, Scheduler
from balloonist.units import format_size

log = logging.getLogger("balloonist.daemon")

#: In the state directory: the daemon's claim on the host's KSM while it manages it.
KSM_CLAIM_FILE = "ksm.json"


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
        self._queue = ChangeQueue()  # operators' changes, from any thread
        self._board = StatusBoard()
        self._live: dict[str, GuestChange] = {}  # live changes in effect (persisted)
        self._periods = saved.periods if saved is not None else 0
        self._saved = saved
        self._closed = False
        self._refresh_specs()
        if saved is not None:
            self._resume(saved)

    # -- the Controller ---------------------------------------------------------------

    def status(self) -> Status | None:
        return self._board.status()

    def history(self, since_version: int = 0) -> Sequence[HistoryPoint]:
        return self._board.history(since_version)

    def change_guest(self, name: str, change: GuestChange) -> None:
        self._queue.guest(name, change)

    def change_policy(self, *, tax_rate: float) -> None:
        self._queue.tax_rate(tax_rate)

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
            self._board.skipped += 1
            cycle = None
        self.backend.settle()
        self._periods += 1
        backend = self.backend
        self._board.publish(
            cycle, self._policy, backend.counters(), backend.guest_counters(), backend.ksm()
        )
        self._save()
        self._board.log_period(self._periods)
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
        for gone in set(self._live) - set(specs):
            del self._live[gone]
        self._queue.update(specs, self.backend.capacity_bytes())

    def _take_changes(self) -> None:
        taken = self._queue.take()
        for name, change in taken.guests.items():
            self._apply_change(name, change, why="live change")
        if (tax := taken.tax_rate) is not None:
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
            else f"; min_cpus {cpu.min_cpus}, max_cpus {cpu.limit_cpus}, cpu_shares {cpu.shares}",
            why,
        )
        return True

    # -- the state file -------------------------------------------------------------------

    def saved_state(self) -> SavedState:
        """What the state file records now."""
        states = self.backend.guest_states()
        estimates = self.scheduler.estimates() if self.backend.resumes_estimates else {}
        guests = {
            spec.name: saved_guest(
                spec,
                states.get(spec.name),
                self._live.get(spec.name) or GuestChange(),
                estimates.get(spec.name),
            )
            for spec in self.backend.configured_specs()
        }
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
    """The daemon over real QEMU VMs: those recorded in a state directory, or those
    ``source`` gives (libvirt domains).

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
        memory_host: VmMemoryHost | None = None,
        ksm_host: KsmHost | None = None,
        cgroups: CgroupHost | None = None,
        on_target: Callable[[str, int], None] | None = None,
        policy: Policy | None = None,
        source: VmSource | None = None,
    ) -> None:
        self.config = config
        self.state = state
        backend = QemuBackend(
            config,
            source or StateDirVms(state, config),
            clock=clock,
            meminfo=meminfo,
            connector=connector,
            vcpu_host=vcpu_host,
            memory_host=memory_host,
            ksm_host=ksm_host,
            cgroups=cgroups,
            ksm_claim=KsmClaim(state.root / KSM_CLAIM_FILE),
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
