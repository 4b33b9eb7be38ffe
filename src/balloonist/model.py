"""Snapshots the scheduler passes around: specs, samples, views, decisions.

All frozen. The policy is a pure function ``Snapshot -> Decision``; everything it may
look at is in here, and nothing in here can change under it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from balloonist.errors import ConfigError
from balloonist.units import format_size


class HostState(enum.Enum):
    """Host free-memory states (ESX): which reclamation mechanisms are allowed."""

    HIGH = "high"  # plenty free: no reclamation
    SOFT = "soft"  # reclaim by ballooning
    HARD = "hard"  # ballooning and host-level paging
    LOW = "low"  # also block guests above target until they are under it

    @property
    def rank(self) -> int:
        return _STATE_RANK[self]


_STATE_RANK = {HostState.HIGH: 0, HostState.SOFT: 1, HostState.HARD: 2, HostState.LOW: 3}


@dataclass(frozen=True)
class CpuSpec:
    """The processor side of a guest's spec: the CPU balloon (the patent's claims 11
    and 19). Processors are counted in whole CPUs: a guest is granted as many host
    processors as it has vCPUs online, and its CPU balloon holds the rest offline."""

    vcpus: int  # vCPUs the guest OS sees
    min_cpus: int = 1  # reservation; a guest always keeps at least one vCPU online
    max_cpus: int | None = None  # limit; defaults to vcpus
    shares: int = 1000
    balloon: bool = True  # has a CPU balloon (without one its vCPUs are all time-sliced)

    def check(self, where: str) -> None:
        if self.vcpus < 1:
            raise ConfigError(
                f"cpus must be at least 1, got {self.vcpus}", where=where, field="cpus"
            )
        if self.shares <= 0:
            raise ConfigError(
                f"cpu_shares must be positive, got {self.shares}", where=where, field="cpu_shares"
            )
        if self.min_cpus < 1:
            raise ConfigError(
                f"min_cpus must be at least 1 (one vCPU always stays online), got {self.min_cpus}",
                where=where,
                field="min_cpus",
            )
        if self.limit_cpus > self.vcpus:
            raise ConfigError(
                f"max_cpus {self.limit_cpus} is above its {self.vcpus} vCPUs",
                where=where,
                field="max_cpus",
            )
        if self.min_cpus > self.limit_cpus:
            raise ConfigError(
                f"min_cpus {self.min_cpus} is above max_cpus {self.limit_cpus}",
                where=where,
                field="min_cpus",
            )

    @property
    def limit_cpus(self) -> int:
        """``max_cpus`` with its default applied."""
        return self.vcpus if self.max_cpus is None else self.max_cpus


@dataclass(frozen=True)
class GuestSpec:
    """What an administrator configured for one guest."""

    name: str
    memory_bytes: int  # configured ("physical") memory the guest OS sees
    min_bytes: int = 0  # reservation: never take the guest below this
    max_bytes: int | None = None  # limit: never give more; defaults to memory_bytes
    shares: int = 1000
    balloon: bool = True  # has a cooperating balloon driver
    cpu: CpuSpec | None = None  # its processors, when the scheduler shares them too

    def __post_init__(self) -> None:
        if self.max_bytes is None:
            object.__setattr__(self, "max_bytes", self.memory_bytes)
        where = f"guest {self.name!r}"
        if self.cpu is not None:
            self.cpu.check(where)
        if self.memory_bytes <= 0:
            raise ConfigError("memory must be positive", where=where, field="memory_bytes")
        if self.shares <= 0:
            raise ConfigError(
                f"shares must be positive, got {self.shares}", where=where, field="shares"
            )
        if self.min_bytes < 0:
            raise ConfigError("min must not be negative", where=where, field="min_bytes")
        if self.limit_bytes > self.memory_bytes:
            raise ConfigError(
                f"max {format_size(self.limit_bytes)} is above memory "
                f"{format_size(self.memory_bytes)}",
                where=where,
                field="max_bytes",
            )
        if self.min_bytes > self.limit_bytes:
            raise ConfigError(
                f"min {format_size(self.min_bytes)} is above max {format_size(self.limit_bytes)}",
                where=where,
                field="min_bytes",
            )

    @property
    def limit_bytes(self) -> int:
        """``max_bytes`` with its default applied (typed as a plain int)."""
        assert self.max_bytes is not None  # set in __post_init__
        return self.max_bytes


@dataclass(frozen=True)
class HostReading:
    """Host memory as the hypervisor backend measures it (no interpretation yet)."""

    time_s: float
    memory_bytes: int
    free_bytes: int
    swap_bytes: int
    swap_used_bytes: int
    cpus: int | None = None  # host processors the guests' vCPUs share, if shared
    truth: HostTruth | None = None  # the host's own count, where the backend reads it


@dataclass(frozen=True)
class HostTruth:
    """The VMs' memory as the host counts it, not as their balloons say (real VMs)."""

    memory_bytes: int  # what the VMs may hold (the daemon's budget)
    held_bytes: int  # what the VMs' processes hold (see HostHeld), all together
    available_bytes: int  # the host's MemAvailable
    #: What the VMs may still take before they hold their budget or the host runs
    #: short: the smaller of the two.
    free_bytes: int

    @property
    def free_fraction(self) -> float:
        return self.free_bytes / self.memory_bytes if self.memory_bytes else 0.0


@dataclass(frozen=True)
class HostSample:
    time_s: float
    memory_bytes: int  # machine memory the guests may share
    free_bytes: int  # machine memory backing no guest page
    swap_bytes: int  # host swap capacity
    swap_used_bytes: int
    state: HostState
    cpus: int | None = None  # host processors the guests' vCPUs share, if shared
    truth: HostTruth | None = None  # the host's own count, where the backend reads it

    @property
    def free_fraction(self) -> float:
        return self.free_bytes / self.memory_bytes if self.memory_bytes else 0.0


@dataclass(frozen=True)
class HostHeld:
    """A guest's memory as the host counts it, not as its balloon says: what its VMM
    process really holds of the host's memory. Pages the guest never touched, pages it
    gave back (ballooned out, or returned by free page reporting) and the part of pages
    KSM merged with other VMs' that others account for are not held."""

    held_bytes: int  # all of it: the guest's RAM and the VMM's own memory
    guest_ram_bytes: int | None = None  # of which the guest's RAM; None: not told apart
    #: Of its pages, those KSM merged with identical ones (its own or other VMs');
    #: None where the host does not say.
    ksm_merged_bytes: int | None = None
    #: What merging saved the host for it, less KSM's bookkeeping; None where unknown.
    ksm_saved_bytes: int | None = None
    #: Host paging: the cap on what its memory cgroup may hold while the host pages it
    #: (None: not capped), and how much of its memory is in the host's swap (None:
    #: not known, or no cgroup of its own).
    cap_bytes: int | None = None
    swapped_bytes: int | None = None

    @property
    def overhead_bytes(self) -> int | None:
        """The VMM's own memory: its code, heap and device state (under TCG, its
        translation cache too)."""
        if self.guest_ram_bytes is None:
            return None
        return max(0, self.held_bytes - self.guest_ram_bytes)


@dataclass(frozen=True)
class CpuSample:
    """A guest's processors, raw, once per period."""

    online_vcpus: int  # vCPUs online: the processors it has now
    balloon_vcpus: int  # vCPUs the CPU balloon holds offline
    balloon_target_vcpus: int  # what the CPU balloon register holds now
    #: The period's average number of runnable tasks, up to its vCPUs: what it would
    #: use with every vCPU online. None when the backend cannot see it.
    demand_vcpus: float | None = None


@dataclass(frozen=True)
class GuestSample:
    """What the hypervisor reports about one guest, raw, once per period."""

    name: str
    allocated_bytes: int  # machine memory now backing the guest's pages
    balloon_bytes: int  # actual balloon size (pages the driver holds)
    balloon_target_bytes: int  # what the balloon register holds now
    active_bytes_observed: int | None = None  # set when a sampling window closes
    active_bytes_so_far: int | None = None  # the open window's count so far (a lower bound)
    free_bytes: int | None = None  # guest-reported free memory, if the guest reports it
    #: What the guest lacks now of the available memory it must keep (the daemon's
    #: ``available_floor`` less its MemAvailable, if positive), as it reported this
    #: period, unsmoothed: a guest that ran short all at once. None where not reported
    #: (the simulator's guests page instead of running out).
    available_short_bytes: int | None = None
    #: How much its available memory fell since its previous report, less what its
    #: balloon took meanwhile: what an allocation burst under way used in the last
    #: interval, so likely needs again in the next (0 if it did not fall). None where
    #: not reported.
    available_fall_bytes: int | None = None
    #: How fast its memory in use grew between its last two reports of available
    #: memory, net of its balloon's moves, in bytes a second (the daemon's
    #: ``vm_figures.use_growth_bytes_per_s``). None where not reported; the policy then
    #: measures it itself between decisions (``policy/growth.py``).
    use_growth_bytes_per_s: float | None = None
    major_faults: int = 0  # cumulative guest major faults
    #: Cumulative seconds the guest's tasks stalled waiting for memory (swap-ins, the
    #: writes that make room for them): what PSI's memory "some" total counts. None
    #: when the backend cannot see it (virtio-balloon statistics do not carry it).
    memory_stall_s: float | None = None
    cooperative: bool = True  # False once the balloon stopped following its register
    #: How fast the adaptive rate controller pacing this balloon lets it inflate now
    #: (sim: the guest's driver; QEMU: the daemon's host-side pacing); None if unknown.
    inflate_rate_bytes_per_s: float | None = None
    cpu: CpuSample | None = None  # its processors, for a guest with a CpuSpec
    #: What the host's own accounting says it holds; None where the backend cannot
    #: read it (the simulator's ``allocated_bytes`` is already the host's count).
    host: HostHeld | None = None
    #: What the guest holds in its own swap (pages it wrote out and may want back);
    #: None where the guest does not report it.
    swap_used_bytes: int | None = None
    #: Whether the host can hold this guest to its allocation by paging it itself,
    #: its balloon deflated (``GuestTarget.host_capped``): the host has swap and the
    #: guest's memory is its to page. The simulator's host can where it has swap; the
    #: daemon's, where host paging is on, the VM has a memory cgroup of its own and the
    #: host has swap (``HostReclaim.paging_of`` in ``daemon/host_reclaim.py``).
    host_cappable: bool = False


@dataclass(frozen=True)
class MemoryPressure:
    """How short of memory a guest has been lately, from its own counters, smoothed
    over a few periods by the scheduler."""

    major_faults_per_s: float
    #: Share of wall time its tasks stalled on memory (0..1), as PSI's "some" line
    #: reports it; None when the guest does not report stall time.
    stall_fraction: float | None = None
    #: The same two over the last sample interval alone, unsmoothed: a guest that just
    #: stopped stalling (it went idle, or got the memory it needed) shows here first.
    major_faults_per_s_now: float | None = None
    stall_fraction_now: float | None = None


@dataclass(frozen=True)
class GuestView:
    """One guest as the policy sees it: spec, raw sample, smoothed working-set estimate."""

    spec: GuestSpec
    sample: GuestSample
    working_set_bytes: int
    #: The smoothed CPU demand (vCPUs busy), for a guest whose processors are shared.
    cpu_demand_vcpus: float | None = None
    #: The working set by the fast average alone (and the open window's lower bound):
    #: what the guest touched lately, without the slow average's long memory.
    recent_working_set_bytes: int | None = None
    #: Fault and stall rates since the last periods; None before a second sample.
    pressure: MemoryPressure | None = None

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class Snapshot:
    """Everything a policy may base one decision on."""

    time_s: float
    period_s: float
    host: HostSample
    guests: tuple[GuestView, ...]


@dataclass(frozen=True)
class Mechanisms:
    """Which reclamation mechanisms the host may use this period."""

    balloon: bool = True  # write balloon targets (inflate/deflate)
    host_paging: bool = False  # page out guests above their allocation target
    block_over_target: bool = False  # stop guests above target from allocating
    #: Host paging reaches guests with a balloon too; off, only guests without one,
    #: whose memory no balloon can take (the others are left to their balloons).
    host_paging_ballooned: bool = True

    @classmethod
    def for_state(cls, state: HostState) -> Mechanisms:
        """ESX's mapping of host state to mechanisms."""
        return cls(
            balloon=True,
            host_paging=state.rank >= HostState.HARD.rank,
            block_over_target=state is HostState.LOW,
        )


@dataclass(frozen=True)
class CpuTarget:
    allocation_cpus: int  # host processors the guest should end up with
    balloon_vcpus: int  # value for the CPU balloon register: vCPUs to hold offline


@dataclass(frozen=True)
class GuestTarget:
    name: str
    allocation_bytes: int  # machine memory the guest should end up with
    balloon_bytes: int  # value for the balloon register
    cpu: CpuTarget | None = None  # its processors, when they are shared
    #: The host, not the balloon, holds the guest to ``allocation_bytes``: its
    #: balloon is deflated (``balloon_bytes`` 0) and the host pages it past its
    #: allocation. Only for a guest whose sample says ``host_cappable``.
    host_capped: bool = False


@dataclass(frozen=True)
class Decision:
    targets: tuple[GuestTarget, ...]
    mechanisms: Mechanisms = field(default_factory=Mechanisms)

    def by_name(self) -> dict[str, GuestTarget]:
        return {t.name: t for t in self.targets}
