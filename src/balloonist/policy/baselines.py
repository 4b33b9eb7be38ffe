"""Baseline policies to compare the shares policy against.

- ``static``: a fixed share of host memory per guest, never rebalanced.
- ``host-swap``: the shares policy's targets, enforced by host paging alone (no
  balloon), i.e. what ballooning is meant to replace.
- ``proxmox``: Proxmox VE's auto-ballooning (``PVE::AutoBalloon::compute_alg1`` as
  called from ``pvestatd``): steer host usage towards 80 %, by shares, 100 MiB per VM
  per 10 s cycle.
- ``mom``: oVirt MOM's default ``balloon.rules``: shrink guests by up to 5 % per cycle
  while host free memory is under 20 %, grow them by 5 % otherwise.

Proxmox and MOM are feedback loops over the balloon registers, not allocators, so two
of their habits need a word. They act once per 10 s cycle; between cycles their
decision repeats the registers as they stand. And their targets can add up to more
than host memory (both leave overcommit to the host kernel's swapping): the balloon
registers are written as the tool computes them, while ``allocation_bytes`` (what the
host enforces by paging, which these policies allow only in HARD and LOW, where a
Linux host would be swapping on its own) is fitted to host memory the way the host
kernel's LRU would: idle memory first, without regard to shares.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from balloonist.model import Decision, GuestTarget, GuestView, HostState, Mechanisms, Snapshot
from balloonist.policy.shares import (
    DEFAULT_FREE_TARGET_FRACTION,
    DEFAULT_TAX_RATE,
    SharesPolicy,
    check_reservations,
    equilibrium_bytes,
    guest_arrays,
    shares_allocations,
)
from balloonist.units import MIB, PAGE_SIZE_BYTES

# -- Proxmox VE (pvestatd + PVE::AutoBalloon) ----------------------------------------------

#: pvestatd refreshes VM status, and runs auto-ballooning, every 10 s.
PVE_INTERVAL_S: Final = 10.0
#: pvestatd: "we try to use about 80% host memory".
PVE_USAGE_GOAL_FRACTION: Final = 0.8
#: pvestatd's ``$maxchange``: no VM moves more than 100 MiB per cycle.
PVE_MAX_CHANGE_BYTES: Final = 100 * MIB
#: compute_alg1 ignores goals within +-10 MiB (not worth a balloon command).
PVE_DEAD_BAND_BYTES: Final = 10 * MIB
#: A VM whose free memory exceeds 25 % of its minimum counts as having memory to spare.
PVE_SPARE_FREE_OF_MIN: Final = 0.25
#: The Perl loop has no cap (it stops on no progress, in a few passes); bound the cost.
_PVE_MAX_PASSES: Final = 1000

# -- oVirt MOM (doc/balloon.rules) ---------------------------------------------------------

#: MOM's default ``policy-engine-interval``.
MOM_INTERVAL_S: Final = 10.0
#: Host free memory below 20 % is "memory pressure": shrink guests.
MOM_PRESSURE_THRESHOLD: Final = 0.20
#: At or below 5 % host free, pressure is critical: guests are pushed into swapping.
MOM_PRESSURE_CRITICAL: Final = 0.05
#: At critical pressure the desired guest free memory is host free minus 5 % (negative).
MOM_CRITICAL_FREE_OFFSET: Final = -0.05
#: Free memory an unconstrained guest would like to keep, as a fraction of its size.
MOM_MIN_GUEST_FREE_FRACTION: Final = 0.20
#: Never change a guest by more than 5 % of its current size per cycle.
MOM_MAX_CHANGE_FRACTION: Final = 0.05
#: Skip changes under 0.25 % of the guest's size: not worth the balloon's overhead.
MOM_MIN_CHANGE_FRACTION: Final = 0.0025

#: The host kernel's LRU takes cold pages first: an idle page counts 100 active ones.
_HOST_LRU_TAX_RATE: Final = 0.99

#: Slack for float time stamps when deciding whether a cycle boundary fell in a period.
_TIME_EPSILON_S: Final = 1e-6


class StaticPolicy:
    """Each guest gets ``host memory x shares / total shares``, clamped to [min, max].

    What clamping frees (or takes) is redistributed among the unclamped guests by
    water-filling, which is the shares equilibrium with no tax and no working sets.
    The result depends on the specs and host size only: the same every period, never
    rebalanced. Ballooning enforces it; the host never pages. Guests without a
    balloon driver are not held to their share at all.
    """

    @property
    def name(self) -> str:
        return "static"

    def decide(self, snapshot: Snapshot) -> Decision:
        check_reservations(snapshot)
        shares, working, mins, maxes = guest_arrays(snapshot.guests)
        allocations = equilibrium_bytes(
            shares,
            np.zeros_like(working),
            mins,
            maxes,
            available_bytes=snapshot.host.memory_bytes,
            tax_rate=0.0,
        ).tolist()
        targets = tuple(
            GuestTarget(g.name, a, g.spec.memory_bytes - a if g.spec.balloon else 0)
            for g, a in zip(snapshot.guests, allocations, strict=True)
        )
        return Decision(targets, Mechanisms(balloon=True, host_paging=False))


class HostSwapPolicy:
    """The shares policy's targets with no balloon: the host pages guests down to them.

    This is the double-paging baseline: the host picks victim pages without the guest
    OS's knowledge of which pages matter, and the guest may later page the same data
    out again itself.
    """

    def __init__(
        self,
        tax_rate: float = DEFAULT_TAX_RATE,
        free_target_fraction: float = DEFAULT_FREE_TARGET_FRACTION,
    ) -> None:
        # The same parameters, checked in one place: the targets are the shares policy's.
        self._shares = SharesPolicy(tax_rate, free_target_fraction)

    @property
    def tax_rate(self) -> float:
        return self._shares.tax_rate

    @property
    def free_target_fraction(self) -> float:
        return self._shares.free_target_fraction

    @property
    def name(self) -> str:
        return "host-swap"

    def decide(self, snapshot: Snapshot) -> Decision:
        allocations = shares_allocations(snapshot, self.tax_rate, self.free_target_fraction)
        targets = tuple(
            GuestTarget(g.name, a, 0)
            for g, a in zip(snapshot.guests, allocations.tolist(), strict=True)
        )
        # No balloon at all: the host enforces every target by paging, in every state.
        return Decision(
            targets, Mechanisms(balloon=False, host_paging=True, block_over_target=False)
        )


class ProxmoxPolicy:
    """Proxmox VE auto-ballooning, after ``pvestatd`` and ``PVE::AutoBalloon``.

    Every 10 s: ``goal = 0.8 x host memory - host used``. A goal beyond +-10 MiB is
    spread over VMs by shares (each VM's desired size is ``min + its share of the
    total above min``, clamped to [min, max]), moving no VM more than 100 MiB. Growth
    goes first to VMs under memory pressure, shrinking first to VMs with memory to
    spare; if that group cannot move at all, every VM is considered. Proxmox only
    balloons VMs with a minimum configured; here every ballooning guest takes part,
    with its ``min`` (possibly 0) as the floor.

    The host pages only in HARD and LOW: Proxmox itself never does, but its Linux host
    swaps on its own once memory runs out, which those states stand for.
    """

    def __init__(
        self,
        interval_s: float = PVE_INTERVAL_S,
        usage_goal_fraction: float = PVE_USAGE_GOAL_FRACTION,
        max_change_bytes: int = PVE_MAX_CHANGE_BYTES,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval must be positive, got {interval_s}")
        if not 0.0 < usage_goal_fraction <= 1.0:
            raise ValueError(f"usage goal must be in (0, 1], got {usage_goal_fraction}")
        if max_change_bytes <= 0:
            raise ValueError(f"max change must be positive, got {max_change_bytes}")
        self.interval_s = interval_s
        self.usage_goal_fraction = usage_goal_fraction
        self.max_change_bytes = max_change_bytes

    @property
    def name(self) -> str:
        return "proxmox"

    def decide(self, snapshot: Snapshot) -> Decision:
        check_reservations(snapshot)
        sizes = [_register_size(g) for g in snapshot.guests]
        if cycle_starts(snapshot.time_s, snapshot.period_s, self.interval_s):
            host = snapshot.host
            used = host.memory_bytes - host.free_bytes
            goal = int(host.memory_bytes * self.usage_goal_fraction - used)
            for index, size in self._compute(snapshot.guests, goal).items():
                sizes[index] = _clamp_size(size, snapshot.guests[index])
        return _register_decision(snapshot, sizes)

    def _compute(self, guests: Sequence[GuestView], goal: int) -> dict[int, int]:
        """New sizes (bytes) for the VMs that change, by index; compute_alg1's logic."""
        every: list[_PveVm] = []
        pressed: list[_PveVm] = []  # VMs short of memory: grown first
        spare: list[_PveVm] = []  # VMs with free memory: shrunk first
        for index, g in enumerate(guests):
            if not g.spec.balloon:
                continue  # no balloon driver: Proxmox leaves the VM alone
            current = g.spec.memory_bytes - g.sample.balloon_bytes
            vm = _PveVm(index, current, g.spec.min_bytes, g.spec.limit_bytes, g.spec.shares)
            every.append(vm)
            free = _guest_free_bytes(g, current)
            has_spare = free > 0 and free > g.spec.min_bytes * PVE_SPARE_FREE_OF_MIN
            if has_spare and current >= vm.minimum:
                spare.append(vm)
            else:
                pressed.append(vm)
        result: dict[int, int] = {}
        if goal > PVE_DEAD_BAND_BYTES:
            rest = self._distribute(result, pressed, goal)
            if rest >= goal:  # no progress with the pressed VMs: consider them all
                self._distribute(result, every, rest)
        elif goal < -PVE_DEAD_BAND_BYTES:
            rest = self._distribute(result, spare, goal)
            if rest <= goal:
                self._distribute(result, every, rest)
        return result

    def _distribute(self, result: dict[int, int], vms: Sequence[_PveVm], amount: int) -> int:
        """Move ``amount`` bytes (signed) among ``vms`` by shares; returns what is left.

        Each pass gives every VM still in play ``min + share x (memory above min +
        rest)``, clamped to [min, max], but at most ``max_change`` away from where it
        started the cycle; VMs already at their desired size drop out. Passes repeat
        until nothing moves or the amount is used up.
        """
        rest = amount
        settled: set[int] = set()
        for _ in range(_PVE_MAX_PASSES):
            active = [vm for vm in vms if vm.index not in settled]
            if rest == 0 or not active:
                break
            shares_total = sum(vm.shares for vm in active)
            above_min = sum(result.get(vm.index, vm.current) - vm.minimum for vm in active)
            pool = above_min + rest
            changes = 0
            progress = 0
            for vm in active:
                desired = vm.minimum + int(pool / shares_total * vm.shares)
                desired = min(vm.maximum, max(vm.minimum, desired))
                if amount > 0 and desired > vm.current:
                    new = min(vm.current + self.max_change_bytes, desired)
                elif desired < vm.current:
                    # Note: shrinks a VM above its share even when growing overall.
                    new = max(vm.current - self.max_change_bytes, desired)
                else:
                    settled.add(vm.index)
                    continue
                if new != vm.current:
                    change = new - result.get(vm.index, vm.current)
                    result[vm.index] = new
                    if change != 0:
                        changes += change
                        progress += abs(new - vm.current)
            rest -= changes
            if progress == 0:
                break  # a pass that moved nothing would repeat itself
        return rest


@dataclass(frozen=True)
class _PveVm:
    index: int
    current: int  # bytes the VM has now (memory less its actual balloon)
    minimum: int
    maximum: int
    shares: int


class MomPolicy:
    """oVirt MOM's default ballooning rules (``doc/balloon.rules``), every 10 s.

    Host free memory under 20 %: every ballooning guest shrinks by 5 % of its current
    size, but not below ``max(min, used + desired free)``, where the desired free
    memory is ``20 % x host free / 20 %`` of the guest's size (at or under 5 % host
    free it turns negative, pushing guests into their own swap). Otherwise every
    guest below its limit grows by 5 %, or at once to ``used + 20 %`` if it is that
    short. Changes under 0.25 % are skipped. "Used" is the guest's size less its
    reported free memory; a guest that reports none is taken to use its working set.
    MOM averages its readings over a sample history; this uses the snapshot's values.

    The host pages only in HARD and LOW, standing in for the KVM host's own swapping.
    """

    def __init__(self, interval_s: float = MOM_INTERVAL_S) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval must be positive, got {interval_s}")
        self.interval_s = interval_s

    @property
    def name(self) -> str:
        return "mom"

    def decide(self, snapshot: Snapshot) -> Decision:
        check_reservations(snapshot)
        sizes = [_register_size(g) for g in snapshot.guests]
        if cycle_starts(snapshot.time_s, snapshot.period_s, self.interval_s):
            host_free = snapshot.host.free_fraction
            for index, g in enumerate(snapshot.guests):
                if not g.spec.balloon:
                    continue
                new = _mom_target(g, host_free)
                if new is not None:
                    sizes[index] = _clamp_size(new, g)
        return _register_decision(snapshot, sizes)


def _mom_target(guest: GuestView, host_free: float) -> int | None:
    """The guest's new size in bytes, or ``None`` to leave its register alone."""
    spec = guest.spec
    current = spec.memory_bytes - guest.sample.balloon_bytes
    used = current - _guest_free_bytes(guest, current)
    if host_free < MOM_PRESSURE_THRESHOLD:
        if host_free <= MOM_PRESSURE_CRITICAL:
            free_fraction = host_free + MOM_CRITICAL_FREE_OFFSET  # below 0: the guest must swap
        else:
            free_fraction = MOM_MIN_GUEST_FREE_FRACTION * host_free / MOM_PRESSURE_THRESHOLD
        floor = max(spec.min_bytes, used + free_fraction * current)
        size = max(current * (1.0 - MOM_MAX_CHANGE_FRACTION), floor)
        if size > current:
            return None  # shrinking only
    else:
        if current >= spec.limit_bytes:
            return None
        floor = max(spec.min_bytes, used + MOM_MIN_GUEST_FREE_FRACTION * current)
        size = min(max(current * (1.0 + MOM_MAX_CHANGE_FRACTION), floor), spec.limit_bytes)
    if abs(size - current) <= MOM_MIN_CHANGE_FRACTION * current:
        return None
    return math.floor(size)


# -- shared helpers ------------------------------------------------------------------------


def cycle_starts(time_s: float, period_s: float, interval_s: float) -> bool:
    """True if a multiple of ``interval_s`` falls in the period ``(time_s - period_s,
    time_s]``: a tool on a fixed timer acts exactly once per interval, and a pure
    policy can tell from the snapshot's clock alone (no remembered "last run")."""
    now = math.floor((time_s + _TIME_EPSILON_S) / interval_s)
    before = math.floor((time_s - period_s + _TIME_EPSILON_S) / interval_s)
    return now != before


def _guest_free_bytes(guest: GuestView, current_bytes: int) -> int:
    """Guest-reported free memory, or, without a report, what its working set leaves."""
    if guest.sample.free_bytes is not None:
        return max(0, guest.sample.free_bytes)
    return max(0, current_bytes - guest.working_set_bytes)


def _clamp_size(size_bytes: int, guest: GuestView) -> int:
    """Whole pages, within [min, max]."""
    pages = max(0, size_bytes) // PAGE_SIZE_BYTES * PAGE_SIZE_BYTES
    return min(guest.spec.limit_bytes, max(guest.spec.min_bytes, pages))


def _register_size(guest: GuestView) -> int:
    """The size the guest's register asks for now (limit for a guest without balloon)."""
    spec = guest.spec
    if not spec.balloon:
        return spec.limit_bytes
    return _clamp_size(spec.memory_bytes - max(0, guest.sample.balloon_target_bytes), guest)


def _register_decision(snapshot: Snapshot, sizes: Sequence[int]) -> Decision:
    """Registers from ``sizes``; allocations from ``sizes`` fitted into host memory.

    The fit stands in for the Linux host's own reclaim, which knows nothing of shares
    and evicts cold pages first: every guest weighs the same, and idle memory is taxed
    so heavily that it goes before anyone's active pages do.
    """
    allocations = list(sizes)
    if sum(allocations) > snapshot.host.memory_bytes:
        _, working, mins, _ = guest_arrays(snapshot.guests)
        allocations = equilibrium_bytes(
            np.ones_like(working),
            working,
            mins,
            np.array(allocations, dtype=np.int64),
            available_bytes=snapshot.host.memory_bytes,
            tax_rate=_HOST_LRU_TAX_RATE,
        ).tolist()
    targets = tuple(
        GuestTarget(g.name, a, g.spec.memory_bytes - size if g.spec.balloon else 0)
        for g, a, size in zip(snapshot.guests, allocations, sizes, strict=True)
    )
    state = snapshot.host.state
    return Decision(
        targets,
        Mechanisms(
            balloon=True,
            host_paging=state.rank >= HostState.HARD.rank,
            block_over_target=False,
        ),
    )
