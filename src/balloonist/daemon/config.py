"""The QEMU daemon's configuration file (``--config host.toml``, every key optional)::

[daemon]
period_s = 1.0
budget = "6GiB"            # memory the VMs may use; default: host memory - reserve
reserve = "1GiB"           # default: the larger of 512MiB and 10 % of host memory
available_floor = "64MiB"  # never leave a guest less available memory than this
stall_timeout_s = 30.0     # a balloon that does not move for this long is uncooperative
host_paging = true         # in HARD and LOW, cap the memory cgroup of a VM whose balloon
                           # does not work, so the host pages it (docs/daemon.md)
processors = "2-7"         # host processors agent VMs' vCPUs share (the CPU balloon);
                           # default: none, processors are left alone
backend = "qemu"           # qemu: the VMs `vm start`/`vm attach` recorded; libvirt:
                           # libvirt domains (docs/libvirt.md); --libvirt says so too
uri = "qemu:///system"     # the libvirt connection
manage_all_domains = false # libvirt: manage every domain with a balloon, not only
                           # those opted in (`balloonist libvirt manage NAME`)

[policy]
name = "demand"            # demand, shares, static, proxmox or mom
tax_rate = 0.75

[ksm]                      # page sharing (docs/daemon.md, "Page sharing")
mode = "auto"              # auto: run KSM by free memory, unless someone else runs
                           # it; off: never touch it
start_below_free = 0.20    # start merging below this share of the VMs' memory free
stop_above_free = 0.30     # stop above this share
pages_to_scan_min = 100    # scan rate at the start threshold...
pages_to_scan_max = 1000   # ...rising to this with nothing free
sleep_ms = 20              # between ksmd's wake-ups

[vms.web]                  # per-VM overrides of what `vm start` recorded; for a
                           # libvirt domain, what its own metadata does not set
min = "256MiB"
max = "1GiB"
shares = 2000
min_cpus = 1               # processors, for agent VMs when processors are shared
max_cpus = 4
cpu_shares = 2000
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Final, Literal

from pydantic import Field, field_validator, model_validator

from balloonist.agent.cpus import parse_cpu_list as cpu_list
from balloonist.config import (
    MAX_CPUS_NAMES,
    MIN_CPUS_NAMES,
    Strict,
    check_policy_name,
    check_size,
    read_toml,
    validate,
)
from balloonist.daemon.pacing import DEFAULT_STALL_TIMEOUT_S
from balloonist.errors import BalloonistError, ConfigError
from balloonist.host import HostMemInfo
from balloonist.ksm import KsmParams
from balloonist.policy import DEFAULT_POLICY
from balloonist.qemu.launcher import VMRecord
from balloonist.units import MIB, format_size, parse_size_bytes

DAEMON_POLICIES = ("demand", "shares", "static", "proxmox", "mom")
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
    host_paging: bool = True
    processors: str | None = None
    backend: Literal["qemu", "libvirt"] = "qemu"
    uri: str | None = Field(default=None, min_length=1)  # None: qemu:///system
    manage_all_domains: bool = False

    _sizes = field_validator("budget", "reserve", "available_floor")(
        classmethod(lambda cls, v: check_size(v))
    )

    @field_validator("processors")
    @classmethod
    def _cpu_list(cls, v: str | None) -> str | None:
        if v is not None:
            parse_cpu_list(v)
        return v

    @property
    def processor_ids(self) -> tuple[int, ...] | None:
        return None if self.processors is None else parse_cpu_list(self.processors)


class PolicyTable(Strict):
    name: str = DEFAULT_POLICY
    tax_rate: float = Field(default=0.75, ge=0.0, lt=1.0)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return check_policy_name(v, DAEMON_POLICIES)


_KSM: Final = KsmParams()


class KsmTable(Strict):
    mode: Literal["auto", "off"] = "auto"
    start_below_free: float = Field(default=_KSM.start_below_free, gt=0, lt=1)
    stop_above_free: float = Field(default=_KSM.stop_above_free, gt=0, lt=1)
    pages_to_scan_min: int = Field(default=_KSM.pages_to_scan_min, ge=1, le=1_000_000)
    pages_to_scan_max: int = Field(default=_KSM.pages_to_scan_max, ge=1, le=1_000_000)
    sleep_ms: int = Field(default=_KSM.sleep_ms, ge=1, le=60_000)

    @model_validator(mode="after")
    def _fits(self) -> KsmTable:
        self.params()  # raises ValueError, which pydantic reports with the table's name
        return self

    def params(self) -> KsmParams:
        return KsmParams(
            start_below_free=self.start_below_free,
            stop_above_free=self.stop_above_free,
            pages_to_scan_min=self.pages_to_scan_min,
            pages_to_scan_max=self.pages_to_scan_max,
            sleep_ms=self.sleep_ms,
        )


class VmTable(Strict):
    min: str | None = None
    max: str | None = None
    shares: int | None = Field(default=None, gt=0)
    min_cpus: int | None = Field(default=None, ge=1, validation_alias=MIN_CPUS_NAMES)
    max_cpus: int | None = Field(default=None, ge=1, validation_alias=MAX_CPUS_NAMES)
    cpu_shares: int | None = Field(default=None, gt=0)

    _sizes = field_validator("min", "max")(classmethod(lambda cls, v: check_size(v)))


class DaemonConfig(Strict):
    daemon: DaemonTable = DaemonTable()
    policy: PolicyTable = PolicyTable()
    ksm: KsmTable = KsmTable()
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
        min_cpus=table.min_cpus or record.min_cpus,
        max_cpus=table.max_cpus or record.max_cpus,
        cpu_shares=table.cpu_shares or record.cpu_shares,
    )
    check_fits(updated, where=f"vms.{record.name}")
    return updated


def check_fits(record: VMRecord, *, where: str) -> None:
    """ConfigError unless min <= max <= memory, and for a VM with known vCPUs,
    min_cpus <= max_cpus <= vCPUs; ``where`` names the settings' place."""
    if not record.min_bytes <= record.max_bytes <= record.memory_bytes:
        raise ConfigError(
            f"min {format_size(record.min_bytes)} / max {format_size(record.max_bytes)} do "
            f"not fit the VM's {format_size(record.memory_bytes)}",
            where=where,
        )
    if record.cpus is not None:
        max_cpus = record.cpus if record.max_cpus is None else record.max_cpus
        if not record.min_cpus <= max_cpus <= record.cpus:
            raise ConfigError(
                f"min_cpus {record.min_cpus} / max_cpus {max_cpus} do not fit the VM's "
                f"{record.cpus} vCPUs",
                where=where,
            )


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """``"0-3,6"`` -> (0, 1, 2, 3, 6): Linux's CPU list format (``taskset -c``), read
    with the agent's own parser, sorted; raises ValueError (for pydantic) naming what is
    wrong, and for an empty list (no processors to share is no ``processors``)."""
    try:
        # Spaces around the commas are for people; sysfs writes none.
        cpus = cpu_list(",".join(part.strip() for part in text.split(",")), where="processors")
    except BalloonistError as exc:
        raise ValueError(str(exc).removeprefix("processors: ")) from None
    if not cpus:
        raise ValueError("an empty list of processors")
    return tuple(sorted(cpus))


__all__ = [
    "DAEMON_POLICIES",
    "DaemonConfig",
    "budget_bytes",
    "check_fits",
    "load_config",
    "parse_cpu_list",
    "with_overrides",
]
