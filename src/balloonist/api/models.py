"""The API's wire format: pydantic models for every request and response body, so the
OpenAPI description is complete, and their conversion from the daemon's
:class:`~balloonist.daemon.status.Status`.

Sizes go out as integers in bytes, named ``*_bytes``. They come in as strings with a
unit (``"512MiB"``, ``"2GiB"``), exactly as in ``host.toml``: a bare number is refused
rather than guessed at (bytes? MiB?), and the unit rules are those of
:func:`balloonist.units.parse_size_bytes`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from balloonist.config import MAX_CPUS_NAMES, MIN_CPUS_NAMES, check_size
from balloonist.daemon.history import GUEST_SERIES, HistoryPoint
from balloonist.daemon.ksm_control import KsmStatus
from balloonist.daemon.mechanisms import Freed
from balloonist.daemon.status import GuestCpuStatus, GuestStatus, HostStatus, PolicyStatus, Status
from balloonist.model import HostHeld
from balloonist.units import parse_size_bytes

#: Largest shares value accepted: far beyond any useful ratio between guests, and
#: small enough that shares times bytes stays exact in the policy's arithmetic.
MAX_SHARES = 1_000_000_000
#: Largest processor count accepted (QEMU's own limit on vCPUs is in the thousands).
MAX_CPUS = 4096

HostStateName = Literal["high", "soft", "hard", "low"]

NonNegative = Annotated[int, Field(ge=0)]


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HostTruthOut(_Out):
    """The VMs' memory as the host counts it (real VMs only)."""

    memory_bytes: NonNegative = Field(description="What the VMs may hold: the budget.")
    held_bytes: NonNegative = Field(
        description="What their QEMU processes hold (Pss: pages KSM merged count once); "
        "a VM whose process cannot be read counts at its balloon's size."
    )
    available_bytes: NonNegative = Field(description="The host's MemAvailable.")
    free_bytes: NonNegative = Field(
        description="What the VMs could still take: memory_bytes less held_bytes, or "
        "available_bytes if that is smaller."
    )


class KsmOut(_Out):
    """The host's page sharing (KSM) and who manages it."""

    mode: Literal["new", "managing", "left alone", "off", "unavailable", "closed"] = Field(
        description="managing: balloonist runs it by free memory; left alone: someone "
        "else does (reason says who); off: turned off in host.toml; unavailable: no KSM "
        "or not allowed."
    )
    reason: str | None = Field(description="Why balloonist does not manage it.")
    running: bool | None = Field(description="ksmd scans now; null if not read.")
    pages_to_scan: NonNegative | None
    sleep_ms: NonNegative | None
    pages_shared: NonNegative | None = Field(description="Merged pages the host keeps.")
    pages_sharing: NonNegative | None = Field(description="Pages mapping them: pages saved.")
    saved_bytes: int | None = Field(
        description="What merging saves, less KSM's bookkeeping (general_profit where "
        "the kernel has it)."
    )

    @classmethod
    def of(cls, ksm: KsmStatus) -> KsmOut:
        knobs, totals = ksm.knobs, ksm.totals
        return cls(
            mode=ksm.mode.value,
            reason=ksm.reason,
            running=None if knobs is None else knobs.running,
            pages_to_scan=None if knobs is None else knobs.pages_to_scan,
            sleep_ms=None if knobs is None else knobs.sleep_ms,
            pages_shared=None if totals is None else totals.pages_shared,
            pages_sharing=None if totals is None else totals.pages_sharing,
            saved_bytes=None if totals is None else totals.saved_bytes,
        )


MechanismName = Literal["sharing", "free_page_reporting", "ballooning", "host_paging"]


class FreedOut(_Out):
    """Memory the host got back, by mechanism (docs/daemon.md, "Where memory came
    from"): sharing (KSM), free_page_reporting (the guests' own), ballooning,
    host_paging (the last resort, for guests whose balloon does not work)."""

    period_bytes: dict[MechanismName, NonNegative] = Field(description="In the last period.")
    total_bytes: dict[MechanismName, NonNegative] = Field(description="Since the daemon started.")

    @classmethod
    def of(cls, freed: Freed) -> FreedOut:
        return cls.model_validate(
            {
                "period_bytes": {str(m): v for m, v in freed.period_bytes.items()},
                "total_bytes": {str(m): v for m, v in freed.total_bytes.items()},
            }
        )


class HostStatusOut(_Out):
    memory_bytes: NonNegative = Field(
        description="What the guests share: the budget, or less when the host is short."
    )
    free_bytes: int = Field(description="memory_bytes less what the guests hold now.")
    swap_bytes: NonNegative
    swap_used_bytes: NonNegative
    state: HostStateName = Field(description="Host free-memory state (see docs/policy.md).")
    cpus: NonNegative | None = Field(
        default=None,
        description="Host processors the guests' vCPUs share; null when they are not shared.",
    )
    truth: HostTruthOut | None = Field(
        default=None, description="The host's own count; null for a simulated host."
    )
    ksm: KsmOut | None = Field(default=None, description="Page sharing; null for a simulated host.")
    freed: FreedOut | None = Field(
        default=None,
        description="What the host got back, by mechanism; null where the host does not "
        "count what the VMs hold (a simulated host).",
    )


class HostOut(HostStatusOut):
    """``GET /v1/host``: the host part of the newest status, with its time."""

    version: NonNegative = Field(description="Status version; increases every period.")
    time_s: float = Field(description="Daemon clock at the end of the period, in seconds.")
    period_s: float = Field(description="Length of one period, in seconds.")


class GuestCpuOut(_Out):
    """A guest's processors: what its CPU balloon holds and what the policy wants."""

    vcpus: int = Field(ge=1, description="vCPUs the guest has.")
    min_cpus: int = Field(ge=1, description="Reservation: processors it always keeps.")
    max_cpus: int = Field(ge=1, description="Limit.")
    shares: int = Field(ge=1)
    allocation_target_cpus: NonNegative = Field(
        description="Processors the policy wants it to have."
    )
    online_vcpus: NonNegative = Field(description="vCPUs online now: the processors it has.")
    balloon_vcpus: NonNegative = Field(description="vCPUs its CPU balloon holds offline.")
    balloon_target_vcpus: NonNegative
    demand_vcpus: float = Field(ge=0, description="The policy's estimate of its CPU demand.")

    @classmethod
    def of(cls, cpu: GuestCpuStatus) -> GuestCpuOut:
        # The wire form is the status field for field; a field added to one and not
        # the other is refused here (extra fields are forbidden), not silently dropped.
        return cls.model_validate(dataclasses.asdict(cpu))


class GuestHostOut(_Out):
    """A guest's memory as the host counts it (its QEMU process's ``smaps``, in
    proportional set size), not as its balloon says."""

    held_bytes: NonNegative = Field(description="What its QEMU process holds, all of it.")
    guest_ram_bytes: NonNegative | None = Field(
        description="Of which the guest's RAM; null when it cannot be told apart."
    )
    overhead_bytes: NonNegative | None = Field(
        description="Of which QEMU's own memory (code, heap, device state, TCG's cache)."
    )
    ksm_merged_bytes: NonNegative | None = Field(
        default=None,
        description="Of its pages, those KSM merged; null where the kernel does not say.",
    )
    ksm_saved_bytes: int | None = Field(
        default=None,
        description="What merging saved for it, less KSM's bookkeeping (Linux 6.4+).",
    )
    unheld_bytes: int | None = Field(
        default=None,
        description="The difference: what its balloon lets it use (allocated_bytes) that "
        "the host does not hold for it (pages never touched, given back by free page "
        "reporting, merged by KSM); allocated_bytes less guest_ram_bytes, null when "
        "its RAM cannot be told apart.",
    )

    cap_bytes: NonNegative | None = Field(
        default=None,
        description="Host paging: the cap on its memory cgroup while the host pages it "
        "(a guest whose balloon does not work, in the HARD and LOW states), as the "
        "period before left it; null when not capped.",
    )
    swapped_bytes: NonNegative | None = Field(
        default=None,
        description="Of its memory, what is in the host's swap (its cgroup's count); "
        "null where not known.",
    )

    @classmethod
    def of(cls, host: HostHeld, allocated_bytes: int) -> GuestHostOut:
        ram = host.guest_ram_bytes
        return cls(
            held_bytes=host.held_bytes,
            guest_ram_bytes=ram,
            overhead_bytes=host.overhead_bytes,
            ksm_merged_bytes=host.ksm_merged_bytes,
            ksm_saved_bytes=host.ksm_saved_bytes,
            unheld_bytes=None if ram is None else allocated_bytes - ram,
            cap_bytes=host.cap_bytes,
            swapped_bytes=host.swapped_bytes,
        )


class GuestOut(_Out):
    name: str
    memory_bytes: NonNegative = Field(description="Configured size.")
    min_bytes: NonNegative
    max_bytes: NonNegative
    shares: int = Field(ge=1)
    allocation_target_bytes: NonNegative = Field(
        description="What the policy wants the guest to have."
    )
    allocated_bytes: NonNegative = Field(description="What the guest has now.")
    balloon_bytes: NonNegative
    balloon_target_bytes: NonNegative
    working_set_bytes: NonNegative = Field(description="The policy's working-set estimate.")
    reclaimed_bytes: int = Field(description="memory_bytes - allocated_bytes.")
    free_bytes: int | None = Field(description="Free memory as the guest reports it, if it does.")
    major_faults: NonNegative
    cooperative: bool
    inflate_rate_bytes_per_s: float | None = Field(
        ge=0,
        description="How fast the adaptive rate controller pacing the balloon lets it "
        "inflate now (the simulator's driver, or the daemon's host-side pacing).",
    )
    cpu: GuestCpuOut | None = Field(
        default=None, description="Its processors; null when they are not shared."
    )
    counters: dict[str, NonNegative] = Field(description="Failure counters of this guest.")
    host: GuestHostOut | None = Field(
        default=None,
        description="What the host counts it holds; null where that cannot be read "
        "(the simulator, a VM whose QEMU process is not known here).",
    )
    available_short_bytes: NonNegative | None = Field(
        default=None,
        description="What the guest lacked this period of the available memory the "
        "daemon keeps it (available_floor); 8 MiB or more and the policy rescues it. "
        "Null where the guest does not report its available memory (the simulator).",
    )

    @classmethod
    def of(cls, guest: GuestStatus) -> GuestOut:
        return cls(
            name=guest.name,
            memory_bytes=guest.memory_bytes,
            min_bytes=guest.min_bytes,
            max_bytes=guest.max_bytes,
            shares=guest.shares,
            allocation_target_bytes=guest.allocation_target_bytes,
            allocated_bytes=guest.allocated_bytes,
            balloon_bytes=guest.balloon_bytes,
            balloon_target_bytes=guest.balloon_target_bytes,
            working_set_bytes=guest.working_set_bytes,
            reclaimed_bytes=guest.memory_bytes - guest.allocated_bytes,
            free_bytes=guest.free_bytes,
            major_faults=guest.major_faults,
            cooperative=guest.cooperative,
            inflate_rate_bytes_per_s=guest.inflate_rate_bytes_per_s,
            cpu=None if guest.cpu is None else GuestCpuOut.of(guest.cpu),
            counters={str(k): v for k, v in guest.counters.items()},
            host=(
                None if guest.host is None else GuestHostOut.of(guest.host, guest.allocated_bytes)
            ),
            available_short_bytes=guest.available_short_bytes,
        )


class GuestListOut(_Out):
    """``GET /v1/guests``."""

    version: NonNegative
    time_s: float
    guests: list[GuestOut]


class PolicyOut(_Out):
    name: str
    tax_rate: float = Field(ge=0.0, lt=1.0)


class StatusOut(_Out):
    """One period, as operators see it (``GET /v1/status`` and each ``status`` event)."""

    version: NonNegative
    time_s: float
    period_s: float
    host: HostStatusOut
    guests: list[GuestOut]
    policy: PolicyOut
    counters: dict[str, NonNegative] = Field(description="Failure counters of the daemon.")

    @classmethod
    def of(cls, status: Status) -> StatusOut:
        return cls(
            version=status.version,
            time_s=status.time_s,
            period_s=status.period_s,
            host=host_out(status.host, status.ksm, status.freed),
            guests=[GuestOut.of(g) for g in status.guests],
            policy=policy_out(status.policy),
            counters={str(k): v for k, v in status.counters.items()},
        )

    def host_view(self) -> HostOut:
        return HostOut(
            **self.host.model_dump(),
            version=self.version,
            time_s=self.time_s,
            period_s=self.period_s,
        )


def host_out(
    host: HostStatus, ksm: KsmStatus | None = None, freed: Freed | None = None
) -> HostStatusOut:
    truth = host.truth
    return HostStatusOut.model_validate(
        {
            "memory_bytes": host.memory_bytes,
            "free_bytes": host.free_bytes,
            "swap_bytes": host.swap_bytes,
            "swap_used_bytes": host.swap_used_bytes,
            "state": host.state,
            "cpus": host.cpus,
            "truth": None if truth is None else dataclasses.asdict(truth),
            "ksm": None if ksm is None else KsmOut.of(ksm),
            "freed": None if freed is None else FreedOut.of(freed),
        }
    )


def policy_out(policy: PolicyStatus) -> PolicyOut:
    return PolicyOut(name=policy.name, tax_rate=policy.tax_rate)


class GuestSeriesOut(_Out):
    """One guest's figures over the history, aligned with ``HistoryOut.time_s``; null
    where the guest was not managed at that period."""

    allocated_bytes: list[NonNegative | None]
    allocation_target_bytes: list[NonNegative | None]
    balloon_bytes: list[NonNegative | None]
    balloon_target_bytes: list[NonNegative | None]
    working_set_bytes: list[NonNegative | None]
    online_vcpus: list[NonNegative | None] = Field(
        description="vCPUs online; null where its processors are not shared."
    )
    allocation_target_cpus: list[NonNegative | None] = Field(
        description="Processors the policy wanted it to have."
    )


class HistoryOut(_Out):
    """``GET /v1/history``: the last minutes of periods, one column per figure (the
    form charts take). Every list has one entry per period, oldest first."""

    version: list[NonNegative] = Field(description="Each period's status version.")
    time_s: list[float] = Field(description="Each period's daemon clock, in seconds.")
    host_memory_bytes: list[NonNegative]
    host_free_bytes: list[int]
    host_state: list[HostStateName]
    host_cpus: list[NonNegative | None] = Field(
        description="Processors the guests shared; null where they were not shared."
    )
    guests: dict[str, GuestSeriesOut] = Field(
        description="Per guest, by name, in the order guests first appear."
    )

    @classmethod
    def of(cls, points: Sequence[HistoryPoint]) -> HistoryOut:
        columns: dict[str, dict[str, list[int | None]]] = {}  # guest -> series -> values
        for i, point in enumerate(points):
            for j, name in enumerate(point.names):
                guest = columns.get(name)
                if guest is None:
                    guest = columns[name] = {k: [None] * len(points) for k in GUEST_SERIES}
                for key in GUEST_SERIES:
                    guest[key][i] = getattr(point, key)[j]
        return cls.model_validate(
            {
                "version": [p.version for p in points],
                "time_s": [p.time_s for p in points],
                "host_memory_bytes": [p.host_memory_bytes for p in points],
                "host_free_bytes": [p.host_free_bytes for p in points],
                "host_state": [p.host_state for p in points],
                "host_cpus": [p.host_cpus for p in points],
                "guests": columns,
            }
        )


# --- requests ---------------------------------------------------------------------------

#: The shape of a size (the units of balloonist.units, any case), for the OpenAPI
#: description; check_size runs first and gives the clearer message.
SIZE_PATTERN = r"^\s*[0-9]+(\.[0-9]+)?\s*([KkMmGgTt]([Ii]?[Bb])?|[Bb])\s*$"

SizeText = Annotated[
    str,
    # Field before the validator: pydantic leaves a pattern that follows a
    # BeforeValidator out of the JSON schema (it still enforces it).
    Field(
        pattern=SIZE_PATTERN,
        description=(
            'A size with a unit, e.g. "512MiB" or "2GiB" (K/M/G/T are binary, KB/MB/GB '
            "decimal); a bare number is refused, so are fractions of a byte and sizes "
            "above 1 PiB."
        ),
        examples=["512MiB"],
    ),
    BeforeValidator(check_size),
]


class _In(BaseModel):
    # Unknown fields are errors: a typo such as "mni" must not be a silent no-op.
    model_config = ConfigDict(extra="forbid", frozen=True)


class GuestPatch(_In):
    """``PATCH /v1/guests/{name}``: fields left out stay as they are."""

    min: SizeText | None = Field(default=None, description="Reservation (never below).")
    max: SizeText | None = Field(default=None, description="Limit (never above).")
    shares: int | None = Field(default=None, ge=1, le=MAX_SHARES, strict=True)
    min_cpus: int | None = Field(
        default=None,
        ge=1,
        le=MAX_CPUS,
        strict=True,
        validation_alias=MIN_CPUS_NAMES,
        description="Processor reservation, for a guest whose processors are shared "
        "(formerly cpu_min, still accepted).",
    )
    max_cpus: int | None = Field(
        default=None,
        ge=1,
        le=MAX_CPUS,
        strict=True,
        validation_alias=MAX_CPUS_NAMES,
        description="Processor limit (formerly cpu_max, still accepted).",
    )
    cpu_shares: int | None = Field(default=None, ge=1, le=MAX_SHARES, strict=True)

    @property
    def min_bytes(self) -> int | None:
        return None if self.min is None else parse_size_bytes(self.min)

    @property
    def max_bytes(self) -> int | None:
        return None if self.max is None else parse_size_bytes(self.max)


class HistoryQuery(_In):
    """``GET /v1/history``'s query; unknown parameters are refused like unknown fields."""

    since: int = Field(
        default=0, ge=0, description="Only periods with a status version above this one."
    )


class GuestChangeOut(_Out):
    """A guest change the daemon accepted; it takes effect at the start of the next
    period (the status after it shows it). Fields that were not changed are null."""

    name: str
    min_bytes: NonNegative | None
    max_bytes: NonNegative | None
    shares: int | None
    min_cpus: int | None = None
    max_cpus: int | None = None
    cpu_shares: int | None = None


class PolicyPatch(_In):
    """``PATCH /v1/policy``."""

    tax_rate: float = Field(
        ge=0.0,
        lt=1.0,
        strict=True,
        allow_inf_nan=False,
        description="Idle memory tax rate, 0 <= tax_rate < 1.",
    )


class PolicyChangeOut(_Out):
    """A policy change the daemon accepted; it takes effect at the next period."""

    tax_rate: float


# --- errors -----------------------------------------------------------------------------


class FieldError(_Out):
    field: str = Field(description='The field at fault, e.g. "min"; "body" for the whole body.')
    message: str = Field(description="The rule it broke.")
    type: str = Field(description='Kind of error, e.g. "value_error", "greater_than_equal".')


class ErrorOut(_Out):
    """Every error response: ``detail`` is one line; ``errors`` is set on 422."""

    detail: str
    errors: list[FieldError] = Field(default_factory=list)
