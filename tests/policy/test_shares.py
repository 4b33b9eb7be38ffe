"""The shares policy: hand-computed equilibria, register rules, and its invariants."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balloonist.errors import ConfigError
from balloonist.model import (
    GuestSpec,
    GuestView,
    HostState,
    Mechanisms,
    Snapshot,
)
from balloonist.policy.shares import (
    SharesPolicy,
    equilibrium_bytes,
    idle_cost_factor,
    shares_per_page,
)
from balloonist.units import MIB, PAGE_SIZE_BYTES
from tests.policy.snapshots import drawn_snapshots

from .snapshots import allocations_mib, balloons_mib, guest, snapshot

PAGE_MIB = PAGE_SIZE_BYTES / MIB
EXACT = SharesPolicy(free_target_fraction=0.0)  # the whole host on offer: round numbers

# -- the equilibrium, by hand --------------------------------------------------------------


def test_no_tax_splits_by_shares_whatever_the_working_sets() -> None:
    # tau = 0 -> k = 1: rho = S / P for everyone, so equal shares get equal memory.
    policy = SharesPolicy(tax_rate=0.0, free_target_fraction=0.0)
    d = policy.decide(snapshot(guest("busy", working_set_mib=1000), guest("idle")))
    assert allocations_mib(d) == [500, 500]


def test_idle_tax_moves_memory_to_the_busy_guest() -> None:
    # k = 4. Busy (all active): P = S x. Idle: P = S x / 4. 1.25 S x = 1000 -> 800 / 200.
    d = EXACT.decide(snapshot(guest("busy", working_set_mib=1000), guest("idle")))
    assert allocations_mib(d) == [800, 200]


def test_partly_active_guest_is_taxed_on_its_idle_part_only() -> None:
    # Busy has A = 512 of H = 1024. Both taxed: (S x + 3*512)/4 + S x/4 = 1024
    # -> S x = 1280, busy = (1280 + 1536)/4 = 704, idle = 320.
    d = EXACT.decide(
        snapshot(
            guest("half", memory_mib=1024, working_set_mib=512),
            guest("idle", memory_mib=1024),
            host_mib=1024,
        )
    )
    assert allocations_mib(d) == [704, 320]


def test_shares_weight_the_split() -> None:
    # Both idle: P = S x / 4 each, so the split follows shares 3:1.
    d = EXACT.decide(snapshot(guest("gold", shares=3000), guest("bronze", shares=1000)))
    assert allocations_mib(d) == [750, 250]


def test_default_free_target_leaves_six_percent_of_the_host_free() -> None:
    # 94 % of 1000 MiB = 940 MiB on offer: 752 / 188 (same 4:1 as above).
    d = SharesPolicy().decide(snapshot(guest("busy", working_set_mib=1000), guest("idle")))
    assert allocations_mib(d) == [752, 188]


def test_reservation_holds_and_the_rest_goes_to_the_other_guest() -> None:
    d = EXACT.decide(snapshot(guest("busy", working_set_mib=1000), guest("idle", min_mib=300)))
    assert allocations_mib(d) == [700, 300]


def test_limit_holds_and_the_rest_goes_to_the_other_guest() -> None:
    d = EXACT.decide(snapshot(guest("busy", working_set_mib=1000, max_mib=600), guest("idle")))
    assert allocations_mib(d) == [600, 400]


def test_everyone_gets_max_when_the_limits_fit() -> None:
    d = SharesPolicy().decide(snapshot(guest("a", memory_mib=300), guest("b", memory_mib=400)))
    assert allocations_mib(d) == [300, 400]


def test_everyone_gets_min_when_the_reservations_take_all_on_offer() -> None:
    # 940 MiB on offer, 960 MiB reserved: reservations win (they still fit the host).
    d = SharesPolicy().decide(snapshot(guest("a", min_mib=480), guest("b", min_mib=480)))
    assert allocations_mib(d) == [480, 480]


def test_reservations_beyond_host_memory_are_refused() -> None:
    with pytest.raises(ConfigError, match="reservations"):
        SharesPolicy().decide(snapshot(guest("a", min_mib=600), guest("b", min_mib=600)))


def test_rho_is_equal_among_guests_not_at_a_bound() -> None:
    # All three are taxed: sum (S x + 3 A) / 4 = 1500 with sum S = 3500, sum A = 800
    # -> x = 36/35 MiB per share; P = (S x + 3 A) / 4.
    guests = (
        guest("a", memory_mib=2000, working_set_mib=700, shares=2000),
        guest("b", memory_mib=2000, working_set_mib=100, shares=1000),
        guest("c", memory_mib=2000, working_set_mib=0, shares=500),
    )
    d = EXACT.decide(snapshot(*guests, host_mib=1500))
    x = 36 / 35
    expected = [(2000 * x + 2100) / 4, (1000 * x + 300) / 4, 500 * x / 4]
    assert allocations_mib(d) == pytest.approx(expected, abs=PAGE_MIB)
    rhos = [
        shares_per_page(g.spec.shares, t.allocation_bytes, g.working_set_bytes, 0.75)
        for g, t in zip(guests, d.targets, strict=True)
    ]
    assert max(rhos) / min(rhos) == pytest.approx(1.0, abs=1e-4)  # one page of flooring


def test_idle_cost_factor() -> None:
    assert idle_cost_factor(0.0) == 1.0
    assert idle_cost_factor(0.75) == 4.0
    with pytest.raises(ValueError, match="tax"):
        idle_cost_factor(1.0)


@pytest.mark.parametrize(
    "kwargs", [{"tax_rate": -0.1}, {"tax_rate": 1.0}, {"free_target_fraction": 1.0}]
)
def test_bad_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SharesPolicy(**kwargs)


def test_equilibrium_refuses_a_guest_with_no_whole_page_between_min_and_max() -> None:
    with pytest.raises(ConfigError, match="no whole page"):
        equilibrium_bytes(
            np.array([1000.0]),
            np.array([0.0]),
            np.array([PAGE_SIZE_BYTES + 1]),
            np.array([PAGE_SIZE_BYTES + 2]),
            available_bytes=MIB,
            tax_rate=0.75,
        )


# -- registers and mechanisms --------------------------------------------------------------


def test_register_is_memory_less_allocation_outside_high() -> None:
    d = EXACT.decide(snapshot(guest("busy", working_set_mib=1000), guest("idle")))
    assert balloons_mib(d) == [200, 800]


def test_high_state_takes_back_nothing_a_guest_uses() -> None:
    # Targets are 800 (busy) and 200 (idle). Busy uses 700: it is held at its target,
    # 800 (its balloon deflates from 300 to 200). Idle uses 900: it keeps all 900 while
    # the host is in HIGH (its balloon stays at 100 instead of inflating to 800).
    d = EXACT.decide(
        snapshot(
            guest("busy", working_set_mib=1000, register_mib=300),
            guest("idle", register_mib=100),
            state=HostState.HIGH,
        )
    )
    assert balloons_mib(d) == [200, 100]
    assert allocations_mib(d) == [800, 200]  # the targets themselves do not change


def test_high_state_balloons_memory_a_guest_has_not_touched() -> None:
    # "fresh" has used only 100 of its 1000: holding it at its 200 target costs it
    # nothing it uses, so the balloon takes the untouched 800 even in HIGH. "busy" uses
    # all of its 1000, above its 800 target, and keeps it.
    d = EXACT.decide(
        snapshot(
            guest("busy", working_set_mib=1000),
            guest("fresh", allocated_mib=100),
            state=HostState.HIGH,
        )
    )
    assert balloons_mib(d) == [0, 800]


def test_high_state_still_enforces_the_limit() -> None:
    d = EXACT.decide(
        snapshot(guest("capped", max_mib=900, working_set_mib=1000), state=HostState.HIGH)
    )
    assert allocations_mib(d) == [900]
    assert balloons_mib(d) == [100]


def test_guest_without_balloon_gets_register_zero() -> None:
    d = EXACT.decide(snapshot(guest("busy", working_set_mib=1000), guest("old", balloon=False)))
    assert allocations_mib(d) == [800, 200]
    assert balloons_mib(d) == [200, 0]


@pytest.mark.parametrize("state", list(HostState))
def test_mechanisms_follow_the_host_state(state: HostState) -> None:
    d = SharesPolicy().decide(snapshot(guest("a"), state=state))
    assert d.mechanisms == Mechanisms.for_state(state)


def test_no_guests_no_targets() -> None:
    assert SharesPolicy().decide(snapshot()).targets == ()


def test_name() -> None:
    assert SharesPolicy().name == "shares"


def test_ten_thousand_guests() -> None:
    rng = np.random.default_rng(7)
    guests = [
        guest(
            f"g{i}",
            memory_mib=int(rng.integers(64, 2048)),
            working_set_mib=int(rng.integers(0, 64)),
            shares=int(rng.integers(1, 10_000)),
        )
        for i in range(10_000)
    ]
    snap = snapshot(*guests, host_mib=4 * 1024 * 1024)
    start = time.perf_counter()
    d = SharesPolicy().decide(snap)
    elapsed_s = time.perf_counter() - start
    total = sum(t.allocation_bytes for t in d.targets)
    assert total <= int(snap.host.memory_bytes * 0.94)
    assert total >= int(snap.host.memory_bytes * 0.94) - 10_000 * PAGE_SIZE_BYTES  # floors only
    # Generous: the benchmark measures properly; this only catches an accidental O(n^2).
    assert elapsed_s < 2.0


# -- properties ----------------------------------------------------------------------------


def snapshots() -> st.SearchStrategy[Snapshot]:
    return drawn_snapshots()


tax_rates = st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9])


@settings(max_examples=300, deadline=None)
@given(snapshots(), tax_rates)
def test_allocations_stay_within_bounds_and_host_memory(snap: Snapshot, tax: float) -> None:
    d = SharesPolicy(tax_rate=tax).decide(snap)
    assert [t.name for t in d.targets] == [g.name for g in snap.guests]
    for g, t in zip(snap.guests, d.targets, strict=True):
        assert g.spec.min_bytes <= t.allocation_bytes <= g.spec.limit_bytes
        assert t.allocation_bytes % PAGE_SIZE_BYTES == 0
        assert t.balloon_bytes % PAGE_SIZE_BYTES == 0
        if g.spec.balloon:
            assert g.spec.memory_bytes - g.spec.limit_bytes <= t.balloon_bytes
            assert t.balloon_bytes <= g.spec.memory_bytes - t.allocation_bytes
        else:
            assert t.balloon_bytes == 0
    assert sum(t.allocation_bytes for t in d.targets) <= snap.host.memory_bytes
    assert SharesPolicy(tax_rate=tax).decide(snap) == d  # deterministic


@settings(max_examples=300, deadline=None)
@given(snapshots(), tax_rates)
def test_memory_on_offer_is_used_up_to_rounding(snap: Snapshot, tax: float) -> None:
    policy = SharesPolicy(tax_rate=tax)
    d = policy.decide(snap)
    offer = int(snap.host.memory_bytes * (1 - policy.free_target_fraction))
    total = sum(t.allocation_bytes for t in d.targets)
    ceiling = sum(g.spec.limit_bytes for g in snap.guests)
    floor = sum(g.spec.min_bytes for g in snap.guests)
    expected = max(floor, min(ceiling, offer))
    # Each guest's allocation is floored to a page, and one page is the float slack.
    assert expected - (len(snap.guests) + 1) * PAGE_SIZE_BYTES <= total <= max(floor, offer)


@settings(max_examples=300, deadline=None)
@given(snapshots(), tax_rates)
def test_unbounded_guests_share_one_ratio(snap: Snapshot, tax: float) -> None:
    d = SharesPolicy(tax_rate=tax, free_target_fraction=0.0).decide(snap)
    inside = [
        shares_per_page(g.spec.shares, t.allocation_bytes, g.working_set_bytes, tax)
        for g, t in zip(snap.guests, d.targets, strict=True)
        # Well away from the bounds and big enough that one page of rounding is small.
        if g.spec.min_bytes + 2 * PAGE_SIZE_BYTES < t.allocation_bytes
        and t.allocation_bytes + 2 * PAGE_SIZE_BYTES < g.spec.limit_bytes
        and t.allocation_bytes >= 512 * PAGE_SIZE_BYTES
    ]
    if len(inside) >= 2:
        assert max(inside) / min(inside) == pytest.approx(1.0, abs=0.01)


@settings(max_examples=200, deadline=None)
@given(snapshots(), tax_rates, st.data())
def test_more_shares_never_mean_less_memory(
    snap: Snapshot, tax: float, data: st.DataObject
) -> None:
    i = data.draw(st.integers(0, len(snap.guests) - 1))
    richer = list(snap.guests)
    g = richer[i]
    spec = GuestSpec(
        g.spec.name,
        g.spec.memory_bytes,
        g.spec.min_bytes,
        g.spec.max_bytes,
        g.spec.shares * 2,
        g.spec.balloon,
    )
    richer[i] = GuestView(spec, g.sample, g.working_set_bytes)
    policy = SharesPolicy(tax_rate=tax)
    before = policy.decide(snap).targets[i].allocation_bytes
    after = policy.decide(Snapshot(0.0, 1.0, snap.host, tuple(richer))).targets[i].allocation_bytes
    assert after >= before - PAGE_SIZE_BYTES  # one page of rounding either way
