"""Free page reporting in the simulator (``free_page_reporting = true`` on a guest).

What it proves:

- the options parse, default off, and a bad value is one located error;
- a frame the guest has freed goes back to the host once it has stayed free for the
  delay (not before), within the delay plus one period, and the host's free memory
  rises by as much; touching it again is a host allocation, as for a new page;
- a workload that frees memory without reporting keeps the host's memory (the
  guest's free list holds it);
- on random hosts, under every policy and schedule, with reporting on or off: no
  resident page sits in a frame reporting gave back, and host memory adds up (free
  pool plus every guest's backed frames is host memory; host swap in use is the
  guests' host-swapped frames);
- with nothing freed (paced moves, no ``frees`` phase) reporting changes nothing at
  all, so a guest with it off runs exactly as before.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.sim.test_machine import FixedPolicy, run

from balloonist.errors import ConfigError
from balloonist.scheduler import Scheduler
from balloonist.sim import engine as e
from balloonist.sim.machine import SimMachine
from balloonist.sim.names import POLICY_NAMES
from balloonist.sim.result import SimResult
from balloonist.sim.runner import run_scenario
from balloonist.sim.scenario import (
    DEFAULT_FREE_PAGE_REPORTING_DELAY_S,
    Scenario,
    scenario_from_dict,
)
from balloonist.units import MIB, PAGE_SIZE_BYTES

FREED_MIB = 120  # what the bursting guest frees when it goes idle
KEPT_MIB = 20  # what it keeps (its idle phase's working set)


def load(data: dict[str, Any]) -> Scenario:
    return scenario_from_dict(data, where="test", default_name="test")


def burst_then_idle(*, at_s: float = 5.0, **guest: Any) -> dict[str, Any]:
    """One guest that touches 140 MiB (a scan: every page within the first second),
    then frees all but 20 MiB at ``at_s``."""
    phases = [
        {"at_s": 0, "workload": {"kind": "scan", "working_set": f"{FREED_MIB + KEPT_MIB}MiB"}},
        {
            "at_s": at_s,
            "frees": True,
            "workload": {"kind": "idle", "working_set": f"{KEPT_MIB}MiB"},
        },
    ]
    return {
        "host": {"memory": "512MiB", "swap": "256MiB"},
        "sim": {"duration_s": 20, "seed": 5},
        "costs": {"reference_s": 2e-5},
        "guests": [
            {
                "name": "g",
                "memory": "256MiB",
                "kernel": "16MiB",
                "workload": {"kind": "phases", "phases": phases},
                **guest,
            }
        ],
    }


#: Every guest keeps all its memory and no balloon moves: whatever the host gets back
#: comes from the guests' own reporting.
KEEP_ALL = FixedPolicy({})


def backed_free_frames(machine: SimMachine) -> int:
    g = machine.guests[0]
    return int(np.count_nonzero((g.p2v == e.FREE) & (g.pstate != e.UNBACKED)))


# -- the options ------------------------------------------------------------------------


def test_reporting_is_off_unless_asked_for_and_its_delay_defaults_to_linux_s() -> None:
    assert load(burst_then_idle()).guests[0].free_page_reporting_delay_s is None
    on = load(burst_then_idle(free_page_reporting=True)).guests[0]
    assert on.free_page_reporting_delay_s == DEFAULT_FREE_PAGE_REPORTING_DELAY_S == 2.0
    custom = burst_then_idle(free_page_reporting=True, free_page_reporting_delay_s=0.5)
    assert load(custom).guests[0].free_page_reporting_delay_s == 0.5
    assert load(burst_then_idle(free_page_reporting=False)) == load(burst_then_idle())
    assert load(burst_then_idle()).guests[0].plan.phases[1].frees


@pytest.mark.parametrize(
    ("guest", "where", "message"),
    [
        (
            {"free_page_reporting_delay_s": 1.0},
            "guests[0].free_page_reporting_delay_s",
            "needs free_page_reporting = true",
        ),
        (
            {"free_page_reporting": True, "free_page_reporting_delay_s": -1.0},
            "guests[0].free_page_reporting_delay_s",
            "greater than or equal to 0",
        ),
        (
            {"free_page_reporting": True, "free_page_reporting_delay_s": 7200.0},
            "guests[0].free_page_reporting_delay_s",
            "less than or equal to 3600",
        ),
        ({"free_page_reporting": "sometimes"}, "guests[0].free_page_reporting", "boolean"),
        ({"free_page_reportng": True}, "guests[0].free_page_reportng", "unknown key"),
    ],
)
def test_a_bad_reporting_option_is_one_located_error(
    guest: dict[str, Any], where: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(burst_then_idle(**guest))
    assert f"test: {where}: " in str(info.value)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_bad_frees_or_report_cost_is_one_located_error() -> None:
    data = burst_then_idle()
    data["guests"][0]["workload"]["phases"][1]["frees"] = "yes please"
    with pytest.raises(ConfigError, match=r"phases\[1\]\.frees: .*boolean"):
        load(data)
    data = burst_then_idle()
    data["costs"]["free_page_report_s"] = -1.0
    with pytest.raises(ConfigError, match=r"costs\.free_page_report_s: .*greater than"):
        load(data)


# -- the model --------------------------------------------------------------------------


@pytest.mark.parametrize("delay_s", [0.0, 0.5, 2.0, 3.3])
def test_freed_memory_goes_back_to_the_host_after_the_delay_and_not_before(
    delay_s: float,
) -> None:
    at_s = 5.0
    sc = load(
        burst_then_idle(at_s=at_s, free_page_reporting=True, free_page_reporting_delay_s=delay_s)
    )
    slice_s = sc.period_s / sc.slices_per_period
    before = run(sc, KEEP_ALL, periods=round(at_s))
    free_before, mapped_before = before.free_pages(), before.guests[0].mapped_pages
    # Still held while the delay runs: after the first period of the idle phase the
    # machine has passed every slice boundary up to a slice before its end.
    first = round(at_s) + 1
    if first - slice_s < at_s + delay_s - 1e-9:
        early = run(sc, KEEP_ALL, periods=first)
        assert early.guests[0].reported_pages == 0
        assert backed_free_frames(early) == FREED_MIB * MIB // PAGE_SIZE_BYTES
    machine = run(sc, KEEP_ALL, periods=math.ceil(at_s + delay_s) + 1)  # delay + a period
    g = machine.guests[0]
    freed_pages = FREED_MIB * MIB // PAGE_SIZE_BYTES
    assert backed_free_frames(machine) == 0
    assert g.reported_pages == freed_pages
    assert g.mapped_pages == mapped_before - freed_pages
    assert machine.free_pages() == free_before + freed_pages
    # the guest's own view is unchanged: the frames are still on its free list
    assert int(g.st[e.S_NFREE]) == g.frames - g.guest.kernel_pages - KEPT_MIB * MIB // 4096
    assert g.time_debt_s >= 0.0


def test_without_reporting_the_freed_memory_stays_with_the_host_guest() -> None:
    machine = run(load(burst_then_idle()), KEEP_ALL, periods=15)
    g = machine.guests[0]
    assert g.reported_pages == 0
    assert backed_free_frames(machine) == FREED_MIB * MIB // PAGE_SIZE_BYTES
    assert g.sample(None, None).host is None  # as before: the sample's host is unset


def test_touching_a_reported_page_again_is_a_host_allocation() -> None:
    def host_allocs_when_it_comes_back(reporting: bool) -> int:
        data = burst_then_idle(at_s=3.0, free_page_reporting=reporting)
        phases = data["guests"][0]["workload"]["phases"]
        phases.append({"at_s": 8.0, "workload": {"kind": "scan", "working_set": "140MiB"}})
        machine = SimMachine(load(data))
        scheduler = Scheduler(machine, KEEP_ALL, period_s=1.0)
        for _ in range(8):
            scheduler.step()
            machine.advance(1.0)
        allocs = int(machine.guests[0].st[e.S_HOST_ALLOC])
        for _ in range(8):
            scheduler.step()
            machine.advance(1.0)
        return int(machine.guests[0].st[e.S_HOST_ALLOC]) - allocs

    # Without reporting the freed frames were still backed: the second burst reuses
    # them for free. With it the host backs each again: one allocation per page freed.
    assert host_allocs_when_it_comes_back(False) == 0
    assert host_allocs_when_it_comes_back(True) == FREED_MIB * MIB // PAGE_SIZE_BYTES


def test_reporting_costs_the_guest_its_report_cost_per_page() -> None:
    data = burst_then_idle(free_page_reporting=True, free_page_reporting_delay_s=0.0)
    data["costs"]["free_page_report_s"] = 1e-3  # 30 720 pages: about 31 s of work
    sc = load(data)
    machine = run(sc, KEEP_ALL, periods=6)
    g = machine.guests[0]
    reported = FREED_MIB * MIB // PAGE_SIZE_BYTES
    assert g.reported_pages == reported
    # reported at 5 s; the guest (idle) has worked off one period of its debt since
    assert g.time_debt_s == pytest.approx(reported * 1e-3 - sc.period_s, abs=1e-3)


def test_the_result_and_the_sample_show_what_reporting_returned() -> None:
    on = run_scenario(load(burst_then_idle(free_page_reporting=True)), policy_name="static")
    off = run_scenario(load(burst_then_idle()), policy_name="static")
    g_on, g_off = on.guest("g"), off.guest("g")
    assert g_off.reported_bytes is None
    assert "free_page_reported_bytes" not in off.summary()["guests"]["g"]
    assert g_on.reported_bytes is not None
    assert on.summary()["guests"]["g"]["free_page_reported_bytes"] == FREED_MIB * MIB
    assert np.all(np.diff(g_on.reported_bytes) >= 0)  # a running total
    assert int(g_on.allocation_bytes[-1]) == int(g_off.allocation_bytes[-1]) - FREED_MIB * MIB
    # the sample tells what the host holds apart from what the balloon leaves the guest
    machine = run(load(burst_then_idle(free_page_reporting=True)), KEEP_ALL, periods=10)
    sample = machine.guests[0].sample(None, None)
    assert sample.host is not None
    assert sample.host.held_bytes == sample.allocated_bytes == sample.host.guest_ram_bytes
    allowance = 256 * MIB - sample.balloon_bytes
    assert sample.host.held_bytes < allowance - FREED_MIB * MIB


# -- properties -------------------------------------------------------------------------


@st.composite
def hosts(draw: st.DrawFn, *, frees: bool = True) -> dict[str, Any]:
    """Small random hosts whose guests burst, free (or not) and come back, each with
    reporting on or off and its own delay."""
    n = draw(st.integers(1, 3))
    guests: list[dict[str, Any]] = []
    for i in range(n):
        memory = draw(st.integers(48, 128))
        ws = draw(st.integers(8, memory))
        kept = draw(st.integers(0, ws // 2))
        idle_at = draw(st.sampled_from([0.5, 1.0, 2.0, 2.25, 3.0]))
        phases = [
            {"at_s": 0, "workload": {"kind": "uniform", "working_set": f"{ws}MiB"}},
            {
                "at_s": idle_at,
                "frees": frees and draw(st.booleans()),
                "workload": {"kind": "idle", "working_set": f"{kept}MiB"},
            },
            {
                "at_s": idle_at + draw(st.sampled_from([1.0, 2.5, 4.0])),
                "frees": frees and draw(st.booleans()),
                "workload": {
                    "kind": draw(st.sampled_from(["zipf", "scan"])),
                    "working_set": f"{ws}MiB",
                },
            },
        ]
        guest: dict[str, Any] = {
            "name": f"g{i}",
            "memory": f"{memory}MiB",
            "kernel": "8MiB",
            "balloon": draw(st.booleans()),
            "replacement": draw(st.sampled_from(["lru", "clock", "fifo"])),
            "workload": {"kind": "phases", "phases": phases},
        }
        if draw(st.booleans()):
            guest["free_page_reporting"] = True
            guest["free_page_reporting_delay_s"] = draw(st.sampled_from([0.0, 0.3, 1.0, 2.0]))
        guests.append(guest)
    return {
        "host": {"memory": f"{draw(st.integers(64, 320))}MiB", "swap": "512MiB"},
        "sim": {
            "duration_s": 8,
            "seed": draw(st.integers(0, 2**31)),
            "period_s": draw(st.sampled_from([0.5, 1.0])),
            "slices_per_period": draw(st.integers(1, 4)),
            "ws_sample_period_s": 2,
        },
        "policy": {"name": draw(st.sampled_from(POLICY_NAMES))},
        "costs": {"reference_s": 2e-4},  # few references: these check accounting
        "guests": guests,
    }


def held_pages_add_up(result: SimResult) -> None:
    held = np.sum([g.allocation_bytes for g in result.guests], axis=0)
    assert np.all(result.host_free_bytes == result.host_memory_bytes - held)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hosts())
def test_reporting_keeps_every_page_counted_under_every_policy(data: dict[str, Any]) -> None:
    # check_every_period: no resident page in a frame reporting gave back, free list and
    # maps agree (check_guest); free pool + backed frames == host memory and host swap
    # in use == host-swapped frames (check_host, every period)
    result = run_scenario(load(data), check_every_period=True)
    held_pages_add_up(result)
    for g, spec in zip(result.guests, data["guests"], strict=True):
        assert (g.reported_bytes is None) == ("free_page_reporting" not in spec)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hosts(frees=False), st.sampled_from([p for p in POLICY_NAMES if not p.startswith("oracle")]))
def test_with_nothing_freed_reporting_changes_nothing(data: dict[str, Any], policy: str) -> None:
    # Paced balloons and no phase that frees: a free frame never has machine memory
    # behind it, so a guest reports nothing and every figure is the same as with
    # reporting off, bit for bit (the hot loop is the same for both).
    off = {**data, "guests": [
        {k: v for k, v in g.items() if not k.startswith("free_page_reporting")}
        for g in data["guests"]
    ]}  # fmt: skip
    on = {**data, "guests": [{**g, "free_page_reporting": True} for g in off["guests"]]}
    a = run_scenario(load(off), policy_name=policy)
    b = run_scenario(load(on), policy_name=policy)
    for ga, gb in zip(a.guests, b.guests, strict=True):
        assert gb.reported_bytes is not None and not gb.reported_bytes.any()
        for key in ("allocation_bytes", "balloon_bytes", "refs", "major_faults", "host_swap_outs"):
            assert np.array_equal(getattr(ga, key), getattr(gb, key)), key
    assert np.array_equal(a.host_free_bytes, b.host_free_bytes)
    summary_b = b.summary()
    for g in summary_b["guests"].values():
        assert g.pop("free_page_reported_bytes") == 0
    assert a.summary() == summary_b


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([0.0, 0.4, 1.0, 2.0, 2.6]),
    st.sampled_from([0.5, 1.0, 2.0]),
    st.integers(1, 4),
    st.sampled_from([1.0, 2.5, 3.0]),
)
def test_freed_memory_is_back_within_the_delay_and_one_period(
    delay_s: float, period_s: float, slices: int, at_s: float
) -> None:
    data = burst_then_idle(at_s=at_s, free_page_reporting=True, free_page_reporting_delay_s=delay_s)
    data["sim"].update(period_s=period_s, slices_per_period=slices, duration_s=12)
    sc = load(data)
    machine = SimMachine(sc)
    scheduler = Scheduler(machine, KEEP_ALL, period_s=period_s)
    # the phase begins at the first slice boundary at or after at_s
    slice_s = period_s / slices
    freed_at_s = math.ceil(at_s / slice_s - 1e-9) * slice_s
    while machine.time_s < freed_at_s + delay_s + period_s - 1e-9:
        scheduler.step()
        machine.advance(period_s)
    assert backed_free_frames(machine) == 0
    assert machine.guests[0].reported_pages == FREED_MIB * MIB // PAGE_SIZE_BYTES
    machine.check_host()
