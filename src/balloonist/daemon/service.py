"""The host daemon: every period, the same scheduler and policy as the simulator, over
the VMs recorded in the state directory.

Configuration (``--config host.toml``, every key optional)::

    [daemon]
    period_s = 1.0
    budget = "6GiB"            # memory the VMs may use; default: host memory - reserve
    reserve = "1GiB"           # default: the larger of 512MiB and 10 % of host memory
    available_floor = "64MiB"  # never leave a guest less available memory than this
    stall_timeout_s = 30.0     # a balloon that does not move for this long is uncooperative

    [policy]
    name = "shares"            # shares, static, proxmox or mom
    tax_rate = 0.75

    [vms.web]                  # per-VM overrides of what `vm start` recorded
    min = "256MiB"
    max = "1GiB"
    shares = 2000

If the daemon stops or dies, guests keep the memory they have; a restarted daemon
starts every guest's target where the guest is (see ``daemon/pacing.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from pydantic import Field, field_validator

from balloonist.config import Strict, check_policy_name, check_size, read_toml, validate
from balloonist.daemon.pacing import DEFAULT_STALL_TIMEOUT_S, Bounds
from balloonist.daemon.qemu_hv import QemuHypervisor, VmPort
from balloonist.errors import BalloonistError, ConfigError
from balloonist.host import HostMemInfo, read_meminfo
from balloonist.policy import Policy
from balloonist.policy.registry import make_policy
from balloonist.qemu.launcher import StateDir, VMRecord
from balloonist.scheduler import Cycle, Scheduler
from balloonist.units import MIB, format_size, parse_size_bytes

log = logging.getLogger("balloonist.daemon")

DAEMON_POLICIES = ("shares", "static", "proxmox", "mom")
#: Host memory kept out of the VMs' budget by default: the host kernel, QEMU's own
#: memory and page cache need room, and 10 % scales that with the host.
MIN_RESERVE_BYTES = 512 * MIB
RESERVE_FRACTION = 0.10


class DaemonTable(Strict):
    period_s: float = Field(default=1.0, gt=0, le=3600)
    budget: str | None = None
    reserve: str | None = None
    available_floor: str = "64MiB"
    stall_timeout_s: float = Field(default=DEFAULT_STALL_TIMEOUT_S, gt=0)

    _sizes = field_validator("budget", "reserve", "available_floor")(
        classmethod(lambda cls, v: check_size(v))
    )


class PolicyTable(Strict):
    name: str = "shares"
    tax_rate: float = Field(default=0.75, ge=0.0, lt=1.0)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return check_policy_name(v, DAEMON_POLICIES)


class VmTable(Strict):
    min: str | None = None
    max: str | None = None
    shares: int | None = Field(default=None, gt=0)

    _sizes = field_validator("min", "max")(classmethod(lambda cls, v: check_size(v)))


class DaemonConfig(Strict):
    daemon: DaemonTable = DaemonTable()
    policy: PolicyTable = PolicyTable()
    vms: dict[str, VmTable] = Field(default_factory=dict)


def load_config(path: Path | None) -> DaemonConfig:
    if path is None:
        return DaemonConfig()
    return validate(DaemonConfig, read_toml(path), where=str(path))


def budget_bytes(config: DaemonConfig, host: HostMemInfo) -> int:
    d = config.daemon
    if d.budget is not None:
        return parse_size_bytes(d.budget)
    reserve = (
        parse_size_bytes(d.reserve)
        if d.reserve is not None
        else max(MIN_RESERVE_BYTES, int(host.total_bytes * RESERVE_FRACTION))
    )
    return max(0, host.total_bytes - reserve)


def with_overrides(record: VMRecord, config: DaemonConfig) -> VMRecord:
    table = config.vms.get(record.name)
    if table is None:
        return record
    updated = replace(
        record,
        min_bytes=parse_size_bytes(table.min) if table.min else record.min_bytes,
        max_bytes=parse_size_bytes(table.max) if table.max else record.max_bytes,
        shares=table.shares or record.shares,
    )
    if not updated.min_bytes <= updated.max_bytes <= updated.memory_bytes:
        raise ConfigError(
            f"min {format_size(updated.min_bytes)} / max {format_size(updated.max_bytes)} do "
            f"not fit the VM's {format_size(updated.memory_bytes)}",
            where=f"vms.{record.name}",
        )
    return updated


class Daemon:
    """One scheduler over the VMs in a state directory."""

    def __init__(
        self,
        config: DaemonConfig,
        state: StateDir,
        *,
        clock: Callable[[], float] = time.monotonic,
        meminfo: Callable[[], HostMemInfo] = read_meminfo,
        connector: Callable[[VMRecord], VmPort] | None = None,
        on_target: Callable[[str, int], None] | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.config = config
        self.state = state
        self._clock = clock
        floor = parse_size_bytes(config.daemon.available_floor)
        self.hv = QemuHypervisor(
            self._records(),
            budget_bytes=budget_bytes(config, meminfo()),
            meminfo=meminfo,
            clock=clock,
            connector=connector,
            bounds_for=lambda r: Bounds(r.min_bytes, r.max_bytes, floor),
            stall_timeout_s=config.daemon.stall_timeout_s,
            on_target=on_target,
        )
        self.scheduler = Scheduler(
            self.hv,
            policy or make_policy(config.policy.name, tax_rate=config.policy.tax_rate),
            period_s=config.daemon.period_s,
        )
        log.info(
            "budget %s for %d VM(s), policy %s, period %.1f s",
            format_size(self.hv.budget_bytes),
            len(self.hv.managed()),
            config.policy.name,
            config.daemon.period_s,
        )

    def _records(self) -> list[VMRecord]:
        records = []
        for name in self.state.names():
            try:
                records.append(with_overrides(self.state.load(name), self.config))
            except BalloonistError as exc:
                log.error("%s: %s; skipped", name, exc)
        return records

    def step(self) -> Cycle | None:
        """One period: pick up added or removed VMs, then collect, decide, act.

        Returns what the period saw and decided, or None if it was skipped.
        """
        self.hv.update_records(self._records())
        try:
            return self.scheduler.step()
        except BalloonistError as exc:
            log.error("cycle skipped: %s", exc)
            return None

    def idle(self, seconds: float, stop: Callable[[], bool] = lambda: False) -> None:
        """Wait between periods while the VMs' ports keep working (see ``serve``)."""
        self.hv.serve(seconds, stop)

    def run(self, stop: threading.Event) -> None:
        period = self.config.daemon.period_s
        try:
            while not stop.is_set():
                started = self._clock()
                self.step()
                self.idle(max(0.0, period - (self._clock() - started)), stop.is_set)
        finally:
            self.hv.close()
            log.info("stopped; guests keep the memory they have")
