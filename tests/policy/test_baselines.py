"""Baseline policies (static, host-swap, Proxmox, MOM), the registry, and the invariants
every policy must keep: bounds, host memory, whole pages, determinism."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balloonist.errors import ConfigError
from balloonist.model import (
    HostState,
    Mechanisms,
    Snapshot,
)
from balloonist.policy import Policy
from balloonist.policy.baselines import (
    HostSwapPolicy,
    MomPolicy,
    ProxmoxPolicy,
    StaticPolicy,
    cycle_starts,
)
from balloonist.policy.registry import POLICY_NAMES, make_policy
from balloonist.policy.shares import SharesPolicy
from balloonist.units import MIB, PAGE_SIZE_BYTES
from tests.policy.snapshots import drawn_snapshots

from .snapshots import allocations_mib, balloons_mib, guest, snapshot

PAGE_MIB = PAGE_SIZE_BYTES / MIB


# -- static --------------------------------------------------------------------------------


def test_static_splits_host_memory_by_shares() -> None:
    d = StaticPolicy().decide(
        snapshot(guest("a"), guest("b", shares=2000), guest("c"), host_mib=1000)
    )
    assert allocations_mib(d) == [250, 500, 250]
    assert balloons_mib(d) == [750, 500, 750]


def test_static_gives_what_a_limit_frees_to_the_others() -> None:
    d = StaticPolicy().decide(
        snapshot(guest("a"), guest("b", shares=2000, max_mib=400), guest("c"), host_mib=1000)
    )
    assert allocations_mib(d) == [300, 400, 300]


def test_static_takes_what_a_reservation_needs_from_the_others() -> None:
    guests = [guest("a", min_mib=400), guest("b"), guest("c"), guest("d")]
    d = StaticPolicy().decide(snapshot(*guests, host_mib=1000))
    assert allocations_mib(d) == [400, 200, 200, 200]


def test_static_ignores_load_state_time_and_registers() -> None:
    quiet = snapshot(guest("a"), guest("b"), state=HostState.HIGH)
    busy = snapshot(
        guest("a", working_set_mib=900, register_mib=300),
        guest("b", register_mib=10),
        state=HostState.LOW,
        time_s=37.0,
    )
    assert StaticPolicy().decide(quiet) == StaticPolicy().decide(busy)


def test_static_mechanisms_and_guest_without_balloon() -> None:
    d = StaticPolicy().decide(snapshot(guest("a"), guest("b", balloon=False), state=HostState.LOW))
    assert d.mechanisms == Mechanisms(balloon=True, host_paging=False, block_over_target=False)
    assert balloons_mib(d) == [500, 0]


# -- host-swap -----------------------------------------------------------------------------


@pytest.mark.parametrize("state", list(HostState))
def test_host_swap_uses_the_shares_targets_without_balloon(state: HostState) -> None:
    snap = snapshot(guest("busy", working_set_mib=1000), guest("idle"), state=state)
    d = HostSwapPolicy(tax_rate=0.75).decide(snap)
    assert allocations_mib(d) == allocations_mib(SharesPolicy(tax_rate=0.75).decide(snap))
    assert allocations_mib(d) == [752, 188]
    assert balloons_mib(d) == [0, 0]
    assert d.mechanisms == Mechanisms(balloon=False, host_paging=True, block_over_target=False)


# -- Proxmox -------------------------------------------------------------------------------


def test_proxmox_grows_pressed_vms_by_at_most_100_mib() -> None:
    # goal = 0.8 * 4000 - (4000 - 3000) = +2200 MiB. Both VMs are short of free memory
    # (10 MiB < 25 % of min), so they grow first; each wants its limit but moves 100 MiB.
    guests = [guest(n, min_mib=200, register_mib=500, free_mib=10) for n in "ab"]
    d = ProxmoxPolicy().decide(snapshot(*guests, host_mib=4000, free_mib=3000))
    assert allocations_mib(d) == [600, 600]
    assert balloons_mib(d) == [400, 400]


def test_proxmox_grows_everyone_when_no_vm_is_pressed() -> None:
    guests = [guest(n, min_mib=200, register_mib=500, free_mib=400) for n in "ab"]
    d = ProxmoxPolicy().decide(snapshot(*guests, host_mib=4000, free_mib=3000))
    assert allocations_mib(d) == [600, 600]


def test_proxmox_shrinks_vms_with_spare_memory_first() -> None:
    # goal = 800 - 1000 = -200 MiB. Only "spare" has free memory to give: pool above min
    # is 500 - 200 = 300 -> it desires 400 but moves at most 100 (600 -> 500). The pass
    # after that moves nothing, so it stops; "pressed" is left alone.
    d = ProxmoxPolicy().decide(
        snapshot(
            guest("spare", min_mib=100, register_mib=400, free_mib=300),
            guest("pressed", min_mib=100, register_mib=600, free_mib=0),
            host_mib=1000,
            free_mib=0,
            state=HostState.HARD,
        )
    )
    assert allocations_mib(d) == [500, 400]
    assert balloons_mib(d) == [500, 600]
    assert d.mechanisms == Mechanisms(balloon=True, host_paging=True, block_over_target=False)


def test_proxmox_growth_also_shrinks_a_vm_above_its_share() -> None:
    # goal = 1600 - 1500 = +100 MiB; pool = 900 + 300 + 100 = 1300 split 1:3 -> desired 325 and 975.
    # compute_alg1 shrinks "fat" even in a grow request (its shrink branch has no sign
    # check), and grows "thin", each by the 100 MiB step.
    d = ProxmoxPolicy().decide(
        snapshot(
            guest("fat", register_mib=100, free_mib=0),
            guest("thin", shares=3000, register_mib=700, free_mib=0),
            host_mib=2000,
            free_mib=500,
        )
    )
    assert allocations_mib(d) == [800, 400]
    assert balloons_mib(d) == [200, 600]


def test_proxmox_ignores_goals_inside_the_dead_band() -> None:
    # used = 805 MiB -> goal = -5 MiB: within +-10 MiB, nothing is written.
    guests = [guest(n, register_mib=600, free_mib=300) for n in "ab"]
    d = ProxmoxPolicy().decide(snapshot(*guests, host_mib=1000, free_mib=195))
    assert allocations_mib(d) == [400, 400]


def test_proxmox_repeats_registers_between_cycles() -> None:
    guests = [guest(n, min_mib=200, register_mib=500, free_mib=10) for n in "ab"]
    d = ProxmoxPolicy().decide(snapshot(*guests, host_mib=4000, free_mib=3000, time_s=5.0))
    assert allocations_mib(d) == [500, 500]
    assert balloons_mib(d) == [500, 500]


def test_proxmox_fits_overcommitted_registers_into_host_memory() -> None:
    # Registers at 0 on a 2:1 overcommitted host: the registers stay (Proxmox would not
    # touch them), but the allocations the host pages towards must fit the host.
    d = ProxmoxPolicy().decide(snapshot(guest("a"), guest("b"), host_mib=1000, time_s=5.0))
    assert balloons_mib(d) == [0, 0]
    assert allocations_mib(d) == [500, 500]


def test_overcommit_fit_takes_idle_memory_first_like_the_host_lru() -> None:
    # Equal weights (the host kernel knows no shares), idle memory taxed at k = 100:
    # (x + 99 * 800) / 100 + x / 100 = 1000 -> x = 10400 -> busy 896, idle 104.
    d = ProxmoxPolicy().decide(
        snapshot(
            guest("busy", working_set_mib=800, shares=1),
            guest("idle", shares=9000),
            host_mib=1000,
            time_s=5.0,
        )
    )
    assert allocations_mib(d) == pytest.approx([896, 104], abs=PAGE_MIB)


@pytest.mark.parametrize(
    ("state", "paging"),
    [
        (HostState.HIGH, False),
        (HostState.SOFT, False),
        (HostState.HARD, True),
        (HostState.LOW, True),
    ],
)
def test_proxmox_and_mom_let_the_host_page_only_when_it_would_swap(
    state: HostState, paging: bool
) -> None:
    for policy in (ProxmoxPolicy(), MomPolicy()):
        d = policy.decide(snapshot(guest("a"), state=state))
        assert d.mechanisms == Mechanisms(balloon=True, host_paging=paging, block_over_target=False)


# -- MOM -----------------------------------------------------------------------------------


def test_mom_shrinks_by_five_percent_under_pressure() -> None:
    # host free 10 % < 20 %: desired guest free = 20 % * 10 % / 20 % = 10 % of 1000.
    # floor = used 500 + 100 = 600; a 5 % step (950) stays above it.
    d = MomPolicy().decide(snapshot(guest("a", free_mib=500), free_mib=100))
    assert allocations_mib(d) == [950]
    assert balloons_mib(d) == [50]


def test_mom_does_not_shrink_below_min() -> None:
    d = MomPolicy().decide(snapshot(guest("a", min_mib=980, free_mib=500), free_mib=100))
    assert allocations_mib(d) == [980]


def test_mom_leaves_a_full_guest_alone_under_normal_pressure() -> None:
    # used 1000 + 10 % free = 1100 > 1000: the ideal size is above the current one.
    d = MomPolicy().decide(snapshot(guest("a", free_mib=0), free_mib=100))
    assert allocations_mib(d) == [1000]


def test_mom_squeezes_even_a_full_guest_at_critical_pressure() -> None:
    # host free 4 % <= 5 %: desired guest free = 4 % - 5 % = -1 % -> 1000 - 10 = 990.
    d = MomPolicy().decide(snapshot(guest("a", free_mib=0), free_mib=40))
    assert allocations_mib(d) == pytest.approx([990], abs=PAGE_MIB)


def test_mom_grows_by_five_percent_without_pressure() -> None:
    d = MomPolicy().decide(snapshot(guest("a", register_mib=200, free_mib=400), free_mib=500))
    assert allocations_mib(d) == pytest.approx([840], abs=PAGE_MIB)


def test_mom_grows_a_short_guest_at_once_to_twenty_percent_free() -> None:
    # used 800 + 20 % of 800 = 960, more than a 5 % step.
    d = MomPolicy().decide(snapshot(guest("a", register_mib=200, free_mib=0), free_mib=500))
    assert allocations_mib(d) == pytest.approx([960], abs=PAGE_MIB)


def test_mom_growth_stops_at_the_limit() -> None:
    d = MomPolicy().decide(snapshot(guest("a", register_mib=10, free_mib=0), free_mib=500))
    assert allocations_mib(d) == [1000]
    assert balloons_mib(d) == [0]


def test_mom_skips_changes_under_a_quarter_percent() -> None:
    # 999 -> 1000 is 0.1 % of the guest: not worth a balloon operation.
    d = MomPolicy().decide(snapshot(guest("a", register_mib=1, free_mib=0), free_mib=500))
    assert balloons_mib(d) == [1]


def test_mom_falls_back_to_the_working_set_without_a_free_report() -> None:
    d = MomPolicy().decide(
        snapshot(guest("a", register_mib=200, working_set_mib=800), free_mib=500)
    )
    assert allocations_mib(d) == pytest.approx([960], abs=PAGE_MIB)


def test_mom_acts_once_per_ten_seconds() -> None:
    snap = snapshot(guest("a", free_mib=500), free_mib=100, time_s=3.0)
    assert balloons_mib(MomPolicy().decide(snap)) == [0]


def test_mom_leaves_guests_without_balloon_at_their_limit() -> None:
    d = MomPolicy().decide(snapshot(guest("a", balloon=False, max_mib=700), free_mib=100))
    assert allocations_mib(d) == [700]
    assert balloons_mib(d) == [0]


# -- cycle timing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("time_s", "period_s", "acts"),
    [
        (0.0, 1.0, True),
        (5.0, 1.0, False),
        (10.0, 1.0, True),
        (11.0, 1.0, False),
        (9.9999999, 1.0, True),  # float drift just under a boundary still counts once
        (10.9999999, 1.0, False),
        (10.0, 0.5, True),
        (10.5, 0.5, False),
        (15.0, 20.0, True),  # periods longer than the interval act every time
    ],
)
def test_cycle_starts(time_s: float, period_s: float, acts: bool) -> None:
    assert cycle_starts(time_s, period_s, 10.0) is acts


@given(st.sampled_from([0.1, 0.25, 0.5, 1.0, 2.0, 3.0]), st.integers(1, 50))
def test_cycle_starts_once_per_interval(period_s: float, cycles: int) -> None:
    steps = round(cycles * 10.0 / period_s)
    times = [k * period_s for k in range(steps)]  # accumulated like a simulator clock
    assert sum(cycle_starts(t, period_s, 10.0) for t in times) == cycles


# -- registry ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("shares", SharesPolicy),
        ("static", StaticPolicy),
        ("host-swap", HostSwapPolicy),
        ("proxmox", ProxmoxPolicy),
        ("mom", MomPolicy),
    ],
)
def test_registry_builds_each_policy(name: str, cls: type) -> None:
    policy = make_policy(name, tax_rate=0.5)
    assert isinstance(policy, cls)
    assert policy.name == name


def test_registry_passes_the_tax_rate() -> None:
    policy = make_policy("shares", tax_rate=0.5)
    assert isinstance(policy, SharesPolicy)
    assert policy.tax_rate == 0.5


def test_registry_refuses_oracle_and_unknown_names() -> None:
    for bound in ("oracle", "oracle-fair"):
        with pytest.raises(ConfigError, match=f"the {bound} policy needs the scenario"):
            make_policy(bound, tax_rate=0.75)
    with pytest.raises(ConfigError, match="unknown policy 'nope'"):
        make_policy("nope", tax_rate=0.75)


# -- invariants of every policy ------------------------------------------------------------


def snapshots() -> st.SearchStrategy[Snapshot]:
    return drawn_snapshots(max_pages=65536, settled=False, timed=True)


ALL_POLICIES = [*POLICY_NAMES]


@pytest.mark.parametrize("name", ALL_POLICIES)
@settings(max_examples=200, deadline=None)
@given(snap=snapshots(), tax=st.sampled_from([0.0, 0.5, 0.75]))
def test_every_policy_keeps_the_invariants(name: str, snap: Snapshot, tax: float) -> None:
    policy: Policy = make_policy(name, tax_rate=tax)
    d = policy.decide(snap)
    assert [t.name for t in d.targets] == [g.name for g in snap.guests]
    for g, t in zip(snap.guests, d.targets, strict=True):
        assert g.spec.min_bytes <= t.allocation_bytes <= g.spec.limit_bytes, g.name
        assert t.allocation_bytes % PAGE_SIZE_BYTES == 0
        assert t.balloon_bytes % PAGE_SIZE_BYTES == 0
        if g.spec.balloon and d.mechanisms.balloon:
            # The register never leaves the guest above its limit or below its min.
            spec = g.spec
            assert spec.memory_bytes - spec.limit_bytes <= t.balloon_bytes
            assert t.balloon_bytes <= spec.memory_bytes - spec.min_bytes
        else:
            assert t.balloon_bytes == 0
    assert sum(t.allocation_bytes for t in d.targets) <= snap.host.memory_bytes
    assert make_policy(name, tax_rate=tax).decide(snap) == d  # deterministic, no hidden state
    assert policy.decide(snap) == d


@settings(max_examples=200, deadline=None)
@given(snapshots())
def test_proxmox_moves_no_vm_more_than_100_mib_per_cycle(snap: Snapshot) -> None:
    d = ProxmoxPolicy().decide(snap)
    for g, t in zip(snap.guests, d.targets, strict=True):
        current = g.spec.memory_bytes - g.sample.balloon_bytes
        inside = g.spec.min_bytes <= current <= g.spec.limit_bytes
        if g.spec.balloon and inside and g.sample.balloon_bytes == g.sample.balloon_target_bytes:
            new = g.spec.memory_bytes - t.balloon_bytes
            assert abs(new - current) <= 100 * MIB + PAGE_SIZE_BYTES


@settings(max_examples=200, deadline=None)
@given(snapshots())
def test_mom_moves_no_guest_more_than_its_step_unless_it_is_short(snap: Snapshot) -> None:
    # Shrinking is always capped at 5 %; growing more is only to reach 20 % free.
    d = MomPolicy().decide(snap)
    for g, t in zip(snap.guests, d.targets, strict=True):
        current = g.spec.memory_bytes - g.sample.balloon_bytes
        inside = g.spec.min_bytes <= current <= g.spec.limit_bytes
        if g.spec.balloon and inside and g.sample.balloon_bytes == g.sample.balloon_target_bytes:
            new = g.spec.memory_bytes - t.balloon_bytes
            assert new >= current * 0.95 - PAGE_SIZE_BYTES
