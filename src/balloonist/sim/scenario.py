"""Scenario files (TOML): parsing, validation, and the typed scenario they describe.

The file format is documented in ``docs/scenarios.md``. Every problem is reported as a
:class:`ConfigError` naming the file and the key, e.g.
``busy.toml: guests[1].min: min 600MiB is above max 512MiB``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import Field, field_validator

from balloonist.config import (
    MAX_CPUS_NAMES,
    MIN_CPUS_NAMES,
    Strict,
    check_policy_name,
    check_size,
    read_toml,
    validate,
)
from balloonist.errors import ConfigError
from balloonist.model import CpuSpec, GuestSpec
from balloonist.policy import DEFAULT_POLICY
from balloonist.policy.workingset import EstimatorParams
from balloonist.rate import RateLimits
from balloonist.sim.cpu import (
    DEFAULT_QUANTUM_S,
    DEFAULT_SWITCH_COST_S,
    CpuCosts,
    CpuWorkload,
)
from balloonist.sim.names import POLICY_NAMES
from balloonist.sim.workload import Phase, Workload, WorkloadKind, WorkloadPlan
from balloonist.units import (
    MIB,
    bytes_to_pages,
    bytes_to_pages_floor,
    format_size,
    parse_size_bytes,
)

#: The built-in scenario (`balloonist demo`, `balloonist daemon --sim`), packaged.
DEMO_RESOURCE = "demo.toml"

#: Free page reporting's delay: Linux's page_reporting runs its pass 2 s after free
#: pages come in (PAGE_REPORTING_DELAY), so a page is free about that long first.
DEFAULT_FREE_PAGE_REPORTING_DELAY_S = 2.0
#: The block a virtio-mem guest plugs and unplugs: 2 MiB, QEMU's default on x86.
VIRTIO_MEM_BLOCK_PAGES: Final = 512
#: The guest pulling one free page off its list and handing it to the host, which
#: discards it: no allocation and no I/O (half of ``balloon_page_s``, which also
#: allocates the page), and Linux hands pages over 2 MiB at a time, one virtqueue
#: round trip per 512 of them.
DEFAULT_FREE_PAGE_REPORT_S = 0.25e-6


class Replacement(enum.IntEnum):
    """Guest page-replacement algorithms; codes shared with the compiled loop."""

    LRU = 0
    CLOCK = 1
    FIFO = 2


# ---------------------------------------------------------------------------------------
# The file schema (pydantic). Unknown keys are errors everywhere.


class HostTable(Strict):
    memory: str
    swap: str = "0B"
    cpus: int | None = Field(default=None, ge=1, le=4096)

    _sizes = field_validator("memory", "swap")(classmethod(lambda cls, v: check_size(v)))


class SimTable(Strict):
    duration_s: float = Field(default=120.0, gt=0, le=86400)
    period_s: float = Field(default=1.0, gt=0, le=3600)
    seed: int = Field(default=1, ge=0, lt=2**63)
    ws_sample_pages: int = Field(default=100, ge=1, le=100_000)
    ws_sample_period_s: float = Field(default=5.0, gt=0, le=3600)
    slices_per_period: int = Field(default=4, ge=1, le=100)


class PolicyTable(Strict):
    name: str = DEFAULT_POLICY
    tax_rate: float = Field(default=0.75, ge=0.0, lt=1.0)
    ws_fast_halflife_s: float = Field(default=5.0, gt=0)
    ws_slow_halflife_s: float = Field(default=30.0, gt=0)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return check_policy_name(v, POLICY_NAMES)


class RateTable(Strict):
    """The simulated driver's rate, per step; it steps once a period (1 s by default).
    Our agent steps every 0.2 s and adds 16 MiB/s a step it got all it asked for
    (``balloonist.rate.RateLimits``): 80 MiB/s more each second, so the simulated
    driver, which steps once a second, adds 80 MiB a step."""

    min: str = "4MiB"
    max: str = "1GiB"
    increase: str = "80MiB"
    divisor: float = Field(default=2.0, gt=1.0)

    _sizes = field_validator("min", "max", "increase")(classmethod(lambda cls, v: check_size(v)))


class CpuTable(Strict):
    """The host's processor scheduling (the CPU balloon; see sim/cpu.py)."""

    quantum_s: float = Field(default=DEFAULT_QUANTUM_S, gt=0, le=1.0)
    switch_cost_s: float = Field(default=DEFAULT_SWITCH_COST_S, ge=0)


class CpuWorkloadTable(Strict):
    kind: Literal["idle", "cpu-bound", "bursty", "parallel"] | str
    threads: int = Field(default=1, ge=0, le=4096)
    duty: float | None = None
    burst_s: float | None = None
    work_per_round_cpu_s: float | None = None

    @field_validator("kind")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in ("idle", "cpu-bound", "bursty", "parallel"):
            raise ValueError(
                f"unknown CPU workload kind {v!r} (choose from idle, cpu-bound, bursty, parallel)"
            )
        return v


class CostsTable(Strict):
    """Simulated seconds each event costs the guest that suffers it."""

    reference_s: float = Field(default=1e-6, gt=0)
    guest_minor_fault_s: float = Field(default=2e-6, ge=0)
    guest_swap_in_s: float = Field(default=100e-6, ge=0)
    guest_swap_out_s: float = Field(default=20e-6, ge=0)
    host_alloc_s: float = Field(default=2e-6, ge=0)
    host_swap_in_s: float = Field(default=110e-6, ge=0)
    host_swap_out_s: float = Field(default=20e-6, ge=0)
    balloon_page_s: float = Field(default=0.5e-6, ge=0)
    free_page_report_s: float = Field(default=DEFAULT_FREE_PAGE_REPORT_S, ge=0)


class WorkloadTable(Strict):
    kind: Literal["idle", "uniform", "zipf", "scan", "phases"] | str
    working_set: str | None = None
    skew: float = Field(default=1.0, gt=0, le=5)
    offset: str = "0B"
    ramp_s: float = Field(default=0.0, ge=0, le=86400)
    phases: list[PhaseTable] | None = None

    @field_validator("kind")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in ("idle", "uniform", "zipf", "scan", "phases"):
            raise ValueError(
                f"unknown workload kind {v!r} (choose from idle, uniform, zipf, scan, phases)"
            )
        return v

    _sizes = field_validator("working_set", "offset")(classmethod(lambda cls, v: check_size(v)))


class PhaseTable(Strict):
    at_s: float = Field(ge=0)
    workload: WorkloadTable
    frees: bool = False


class GuestTable(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    memory: str
    min: str = "0B"
    max: str | None = None
    shares: int = Field(default=1000, gt=0, le=10**9)
    replacement: Literal["lru", "clock", "fifo"] = "lru"
    balloon: bool = True
    kernel: str = "16MiB"
    swap: str | None = None
    workload: WorkloadTable
    cpus: int | None = Field(default=None, ge=1, le=4096)
    min_cpus: int = Field(default=1, ge=1, le=4096, validation_alias=MIN_CPUS_NAMES)
    max_cpus: int | None = Field(default=None, ge=1, le=4096, validation_alias=MAX_CPUS_NAMES)
    cpu_shares: int = Field(default=1000, gt=0, le=10**9)
    cpu_balloon: bool = True
    cpu_workload: CpuWorkloadTable | None = None
    free_page_reporting: bool = False
    free_page_reporting_delay_s: float | None = Field(default=None, ge=0, le=3600)
    virtio_mem: bool = False

    _sizes = field_validator("memory", "min", "max", "kernel", "swap")(
        classmethod(lambda cls, v: check_size(v))
    )


WorkloadTable.model_rebuild()


class ScenarioFile(Strict):
    name: str | None = None
    description: str = ""
    host: HostTable
    sim: SimTable = SimTable()
    policy: PolicyTable = PolicyTable()
    rate: RateTable = RateTable()
    costs: CostsTable = CostsTable()
    cpu: CpuTable = CpuTable()
    guests: list[GuestTable] = Field(min_length=1, max_length=10_000)


# ---------------------------------------------------------------------------------------
# The typed scenario the simulator runs.


@dataclass(frozen=True)
class Costs:
    reference_s: float
    guest_minor_fault_s: float
    guest_swap_in_s: float
    guest_swap_out_s: float
    host_alloc_s: float
    host_swap_in_s: float
    host_swap_out_s: float
    balloon_page_s: float
    free_page_report_s: float = DEFAULT_FREE_PAGE_REPORT_S


@dataclass(frozen=True)
class SimGuest:
    spec: GuestSpec
    replacement: Replacement
    kernel_pages: int  # memory the guest kernel keeps for itself, never swapped or ballooned
    swap_pages: int  # guest swap device
    plan: WorkloadPlan
    cpu_workload: CpuWorkload | None = None  # what runs on its vCPUs (spec.cpu is set)
    #: With free page reporting, how long a page stays free before the guest reports
    #: it to the host; None: the guest does not report.
    free_page_reporting_delay_s: float | None = None
    #: Resized through virtio-mem rather than ballooned: the register moves in whole
    #: blocks (``VIRTIO_MEM_BLOCK_PAGES``), as a guest plugs and unplugs them.
    virtio_mem: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def memory_pages(self) -> int:
        return bytes_to_pages(self.spec.memory_bytes)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    host_memory_bytes: int
    host_swap_bytes: int
    duration_s: float
    period_s: float
    seed: int
    ws_sample_pages: int
    ws_sample_periods: int  # sampling window, in scheduler periods
    slices_per_period: int
    policy_name: str
    tax_rate: float
    estimator: EstimatorParams
    rate: RateLimits
    costs: Costs
    guests: tuple[SimGuest, ...] = field(default_factory=tuple)
    host_cpus: int | None = None  # processors the guests' vCPUs share (the CPU balloon)
    cpu_costs: CpuCosts = field(default_factory=CpuCosts)

    @property
    def periods(self) -> int:
        return max(1, round(self.duration_s / self.period_s))


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario file; any problem is one ``ConfigError``."""
    return scenario_from_dict(read_toml(path), where=str(path), default_name=path.stem)


def load_scenario_or_demo(path: Path | None) -> Scenario:
    """A scenario file, or the built-in demo scenario when ``path`` is None.

    Every error names the file: some (a size checked inside the schema) arrive
    without a location, and the one-line message owes the user at least that.
    """
    if path is None:
        resource = resources.files("balloonist") / "scenarios" / DEMO_RESOURCE
        with resources.as_file(resource) as demo:
            return load_scenario(demo)
    try:
        return load_scenario(path)
    except ConfigError as exc:
        if exc.where:
            raise
        raise ConfigError(exc.message, where=str(path)) from exc


def scenario_from_dict(data: dict[str, Any], *, where: str, default_name: str) -> Scenario:
    raw = validate(ScenarioFile, data, where=where)
    return _build(raw, where, default_name)


def _build(raw: ScenarioFile, where: str, default_name: str) -> Scenario:
    host_memory = parse_size_bytes(raw.host.memory)
    if host_memory < 64 * MIB:
        raise ConfigError("host memory must be at least 64MiB", where=f"{where}: host.memory")
    host_swap = parse_size_bytes(raw.host.swap)
    guests: list[SimGuest] = []
    names: set[str] = set()
    for i, g in enumerate(raw.guests):
        gwhere = f"{where}: guests[{i}]"
        if g.name in names:
            raise ConfigError(f"duplicate guest name {g.name!r}", where=f"{gwhere}.name")
        names.add(g.name)
        guests.append(_guest(g, raw.host.cpus, gwhere))
    reserved = sum(g.spec.min_bytes for g in guests)
    if reserved > host_memory:
        raise ConfigError(
            f"the guests' reservations add up to {format_size(reserved)}, more than host "
            f"memory {format_size(host_memory)}",
            where=f"{where}: guests[*].min",
        )
    try:
        estimator = EstimatorParams(raw.policy.ws_fast_halflife_s, raw.policy.ws_slow_halflife_s)
    except ValueError as exc:
        raise ConfigError(str(exc), where=f"{where}: policy") from None
    try:
        rate = RateLimits(
            min_units=max(1, bytes_to_pages_floor(parse_size_bytes(raw.rate.min))),
            max_units=bytes_to_pages_floor(parse_size_bytes(raw.rate.max)),
            increase_units=bytes_to_pages_floor(parse_size_bytes(raw.rate.increase)),
            divisor=raw.rate.divisor,
        )
    except ValueError as exc:
        raise ConfigError(str(exc), where=f"{where}: rate") from None
    if raw.sim.period_s > raw.sim.duration_s:
        raise ConfigError("period_s is longer than duration_s", where=f"{where}: sim.period_s")
    try:
        cpu_costs = CpuCosts(quantum_s=raw.cpu.quantum_s, switch_cost_s=raw.cpu.switch_cost_s)
    except ConfigError as exc:
        raise ConfigError(exc.message.removeprefix("CpuCosts."), where=f"{where}: cpu") from None
    if raw.host.cpus is not None:
        quanta = raw.sim.period_s / cpu_costs.quantum_s
        if abs(quanta - round(quanta)) > 1e-9 * quanta:
            raise ConfigError(
                f"period_s {raw.sim.period_s:g} is not a whole number of CPU quanta "
                f"({cpu_costs.quantum_s:g} s)",
                where=f"{where}: cpu.quantum_s",
            )
    c = raw.costs
    return Scenario(
        name=raw.name or default_name,
        description=raw.description,
        host_memory_bytes=host_memory,
        host_swap_bytes=host_swap,
        duration_s=raw.sim.duration_s,
        period_s=raw.sim.period_s,
        seed=raw.sim.seed,
        ws_sample_pages=raw.sim.ws_sample_pages,
        ws_sample_periods=max(1, round(raw.sim.ws_sample_period_s / raw.sim.period_s)),
        slices_per_period=raw.sim.slices_per_period,
        policy_name=raw.policy.name,
        tax_rate=raw.policy.tax_rate,
        estimator=estimator,
        rate=rate,
        costs=Costs(
            reference_s=c.reference_s,
            guest_minor_fault_s=c.guest_minor_fault_s,
            guest_swap_in_s=c.guest_swap_in_s,
            guest_swap_out_s=c.guest_swap_out_s,
            host_alloc_s=c.host_alloc_s,
            host_swap_in_s=c.host_swap_in_s,
            host_swap_out_s=c.host_swap_out_s,
            balloon_page_s=c.balloon_page_s,
            free_page_report_s=c.free_page_report_s,
        ),
        guests=tuple(guests),
        host_cpus=raw.host.cpus,
        cpu_costs=cpu_costs,
    )


def _guest(g: GuestTable, host_cpus: int | None, gwhere: str) -> SimGuest:
    """One guest's table, checked; ``gwhere`` names it in errors."""
    memory = _pages_exact(g.memory, f"{gwhere}.memory")
    if memory < 16 * MIB:
        raise ConfigError("guest memory must be at least 16MiB", where=f"{gwhere}.memory")
    min_b = _pages_exact(g.min, f"{gwhere}.min")
    max_b = _pages_exact(g.max, f"{gwhere}.max") if g.max is not None else memory
    if max_b > memory:
        raise ConfigError(
            f"max {format_size(max_b)} is above memory {format_size(memory)}",
            where=f"{gwhere}.max",
        )
    if min_b > max_b:
        raise ConfigError(
            f"min {format_size(min_b)} is above max {format_size(max_b)}",
            where=f"{gwhere}.min",
        )
    kernel = _pages_exact(g.kernel, f"{gwhere}.kernel")
    if kernel >= memory // 2:
        raise ConfigError("kernel must be under half the guest memory", where=f"{gwhere}.kernel")
    swap = _pages_exact(g.swap, f"{gwhere}.swap") if g.swap is not None else 2 * memory
    plan = _plan(g.workload, f"{gwhere}.workload")
    if plan.virtual_pages * 4096 > memory - kernel + swap:
        raise ConfigError(
            f"the workload touches {format_size(plan.virtual_pages * 4096)}, more than the "
            f"guest's memory less kernel plus swap ({format_size(memory - kernel + swap)})",
            where=f"{gwhere}.workload",
        )
    cpu, cpu_workload = _cpu(g, host_cpus, gwhere)
    spec = GuestSpec(
        name=g.name,
        memory_bytes=memory,
        min_bytes=min_b,
        max_bytes=max_b,
        shares=g.shares,
        balloon=g.balloon,
        cpu=cpu,
    )
    return SimGuest(
        spec=spec,
        replacement=Replacement[g.replacement.upper()],
        kernel_pages=bytes_to_pages(kernel),
        swap_pages=bytes_to_pages(swap),
        plan=plan,
        cpu_workload=cpu_workload,
        free_page_reporting_delay_s=_reporting_delay_s(g, gwhere),
        virtio_mem=g.virtio_mem,
    )


def _reporting_delay_s(g: GuestTable, where: str) -> float | None:
    """The guest's free page reporting delay, or None if it does not report."""
    if not g.free_page_reporting:
        if g.free_page_reporting_delay_s is not None:
            raise ConfigError(
                "needs free_page_reporting = true", where=f"{where}.free_page_reporting_delay_s"
            )
        return None
    if g.free_page_reporting_delay_s is None:
        return DEFAULT_FREE_PAGE_REPORTING_DELAY_S
    return g.free_page_reporting_delay_s


def _cpu(
    g: GuestTable, host_cpus: int | None, where: str
) -> tuple[CpuSpec | None, CpuWorkload | None]:
    """A guest's processors: its CpuSpec and what runs on its vCPUs, or None, None for
    a guest whose processors are not modelled (no ``cpus``)."""
    if g.cpus is None:
        for key in ("max_cpus", "cpu_workload"):
            if getattr(g, key) is not None:
                raise ConfigError("needs cpus, the guest's vCPUs", where=f"{where}.{key}")
        return None, None
    if host_cpus is None:
        raise ConfigError(
            "a guest with cpus needs host.cpus, the processors the guests share",
            where=f"{where}.cpus",
        )
    spec = CpuSpec(
        vcpus=g.cpus,
        min_cpus=g.min_cpus,
        max_cpus=g.max_cpus,
        shares=g.cpu_shares,
        balloon=g.cpu_balloon,
    )
    spec.check(where)
    w = g.cpu_workload
    try:
        if w is None:
            workload = CpuWorkload.idle()
        else:
            workload = CpuWorkload(
                kind=w.kind,  # type: ignore[arg-type]  # checked by the table's validator
                threads=w.threads,
                duty=w.duty,
                burst_s=w.burst_s,
                work_per_round_cpu_s=w.work_per_round_cpu_s,
            )
    except ConfigError as exc:
        message = exc.message.removeprefix("CpuWorkload.")  # the file's key names it
        raise ConfigError(message, where=f"{where}.cpu_workload") from None
    return spec, workload


def _pages_exact(text: str, where: str) -> int:
    """Size in bytes, which must be a whole number of pages."""
    size = parse_size_bytes(text)
    if size % 4096:
        raise ConfigError(f"{text!r} is not a whole number of 4KiB pages", where=where)
    return size


_KINDS = {
    "idle": WorkloadKind.IDLE,
    "uniform": WorkloadKind.UNIFORM,
    "zipf": WorkloadKind.ZIPF,
    "scan": WorkloadKind.SCAN,
}


def _plan(w: WorkloadTable, where: str) -> WorkloadPlan:
    if w.kind == "phases":
        if not w.phases:
            raise ConfigError("a phases workload needs a non-empty 'phases' list", where=where)
        if w.working_set is not None:
            raise ConfigError("set working_set inside each phase", where=f"{where}.working_set")
        phases: list[Phase] = []
        for i, p in enumerate(w.phases):
            pwhere = f"{where}.phases[{i}]"
            if p.workload.kind == "phases":
                raise ConfigError("phases cannot nest", where=f"{pwhere}.workload.kind")
            phases.append(Phase(p.at_s, _single(p.workload, f"{pwhere}.workload"), p.frees))
        if phases[0].at_s != 0.0:
            raise ConfigError("the first phase must start at at_s = 0", where=f"{where}.phases[0]")
        if [p.at_s for p in phases] != sorted({p.at_s for p in phases}):
            raise ConfigError("phases must be in strictly increasing at_s order", where=where)
        return WorkloadPlan(tuple(phases))
    if w.phases is not None:
        raise ConfigError("'phases' is only for kind = \"phases\"", where=f"{where}.phases")
    return WorkloadPlan.single(_single(w, where))


def _single(w: WorkloadTable, where: str) -> Workload:
    kind = _KINDS[w.kind]
    if kind is WorkloadKind.IDLE:
        ws = _pages_exact(w.working_set, f"{where}.working_set") if w.working_set else 0
    else:
        if w.working_set is None:
            raise ConfigError(f"a {w.kind} workload needs working_set", where=where)
        ws = _pages_exact(w.working_set, f"{where}.working_set")
        if ws < 4096:
            raise ConfigError("working_set must be at least one page", where=f"{where}.working_set")
    offset = _pages_exact(w.offset, f"{where}.offset")
    return Workload(
        kind=kind,
        working_set_pages=ws // 4096,
        skew=w.skew,
        offset_pages=offset // 4096,
        ramp_s=w.ramp_s,
    )
