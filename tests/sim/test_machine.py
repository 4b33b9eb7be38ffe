"""The simulated host: ballooning frees machine memory, the guest OS picks victims,
host paging causes double paging, the invariants hold, and runs are reproducible."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balloonist.model import Decision, GuestTarget, Mechanisms, Snapshot
from balloonist.scheduler import Scheduler
from balloonist.sim import engine as e
from balloonist.sim.invariants import check_guest
from balloonist.sim.machine import SimMachine
from balloonist.sim.scenario import Scenario, scenario_from_dict
from balloonist.units import MIB


def scenario(data: dict[str, Any]) -> Scenario:
    return scenario_from_dict(data, where="test", default_name="test")


@dataclass
class FixedPolicy:
    """Targets given up front, per guest name, in MiB of allocation."""

    allocation_mib: dict[str, int]
    mechanisms: Mechanisms = field(default_factory=lambda: Mechanisms(balloon=True))

    @property
    def name(self) -> str:
        return "fixed"

    def decide(self, snapshot: Snapshot) -> Decision:
        targets = []
        for v in snapshot.guests:
            alloc = self.allocation_mib.get(v.name, v.spec.memory_bytes // MIB) * MIB
            balloon = v.spec.memory_bytes - alloc if self.mechanisms.balloon else 0
            targets.append(GuestTarget(v.name, alloc, balloon))
        return Decision(tuple(targets), self.mechanisms)


def run(sc: Scenario, policy: FixedPolicy, periods: int) -> SimMachine:
    machine = SimMachine(sc)
    scheduler = Scheduler(machine, policy, period_s=sc.period_s)
    for _ in range(periods):
        scheduler.step()
        machine.advance(sc.period_s)
        for g in machine.guests:
            check_guest(g)
    return machine


def one_guest(workload: dict[str, Any], **guest: Any) -> dict[str, Any]:
    return {
        "host": {"memory": "512MiB", "swap": "512MiB"},
        "sim": {"duration_s": 30, "seed": 7},
        "costs": {"reference_s": 2e-5},
        "guests": [
            {"name": "g", "memory": "256MiB", "kernel": "16MiB", "workload": workload, **guest}
        ],
    }


def test_inflating_the_balloon_frees_the_machine_memory_behind_it() -> None:
    # The guest touches 200 MiB, then goes idle; a 128 MiB balloon must hand that much
    # machine memory back to the host, taken by the guest's own choice of victims.
    data = one_guest(
        {
            "kind": "phases",
            "phases": [
                {"at_s": 0, "workload": {"kind": "scan", "working_set": "200MiB"}},
                {"at_s": 4, "workload": {"kind": "idle"}},
            ],
        }
    )
    sc = scenario(data)
    before = run(sc, FixedPolicy({"g": 256}), 4)
    mapped_before = before.guests[0].mapped_pages
    assert mapped_before * 4096 >= 210 * MIB  # kernel + 200 MiB touched

    machine = run(sc, FixedPolicy({"g": 128}), 40)
    g = machine.guests[0]
    assert int(g.st[e.S_BALLOON]) * 4096 == 128 * MIB
    # every ballooned frame lost its machine page, so the guest holds <= 128 MiB
    assert g.mapped_pages * 4096 <= 128 * MIB
    assert machine.free_pages() * 4096 >= (512 - 128) * MIB
    assert int(g.st[e.S_GUEST_SWAP_OUT]) > 0  # the guest paged to make room, not the host
    assert int(g.st[e.S_HOST_SWAP_OUT]) == 0


def test_a_sample_carries_the_driver_rate_per_second_and_none_without_a_balloon() -> None:
    data = one_guest({"kind": "uniform", "working_set": "100MiB"})
    data["guests"].append(
        {"name": "fixed", "memory": "128MiB", "balloon": False, "workload": {"kind": "idle"}}
    )
    data["sim"]["period_s"] = 0.5
    machine = run(scenario(data), FixedPolicy({"g": 128}), 6)
    driver = machine.drivers[0]
    assert driver is not None and driver.rate.successes > 0  # it has grown from the start
    rates = {s.name: s.inflate_rate_bytes_per_s for s in machine.sample_guests()}
    assert rates["g"] == driver.rate.step_units * 4096 / 0.5
    assert rates["fixed"] is None


def test_deflating_gives_the_guest_its_memory_back() -> None:
    sc = scenario(one_guest({"kind": "uniform", "working_set": "200MiB"}))
    machine = SimMachine(sc)
    policy = FixedPolicy({"g": 100})
    scheduler = Scheduler(machine, policy, period_s=1.0)
    for _ in range(30):
        scheduler.step()
        machine.advance(1.0)
    g = machine.guests[0]
    faults_small = int(g.st[e.S_MAJOR])
    assert g.st[e.S_BALLOON] * 4096 == 156 * MIB
    policy.allocation_mib["g"] = 256
    for _ in range(5):
        scheduler.step()
        machine.advance(1.0)
    assert g.st[e.S_BALLOON] == 0
    before = int(g.st[e.S_MAJOR])
    for _ in range(10):
        scheduler.step()
        machine.advance(1.0)
    # with the whole working set back in memory the guest stops faulting
    assert faults_small > 0
    assert int(g.st[e.S_MAJOR]) - before < 0.02 * (before or 1) + 50_000
    assert g.mapped_pages * 4096 >= 200 * MIB


def test_host_paging_without_a_balloon_causes_double_paging() -> None:
    # Host pages the guest behind its back; the guest, short of memory too, then evicts
    # pages the host already swapped out.
    data = one_guest({"kind": "uniform", "working_set": "240MiB"}, memory="200MiB")
    data["guests"][0]["swap"] = "512MiB"
    sc = scenario(data)
    machine = run(sc, FixedPolicy({"g": 120}, Mechanisms(balloon=False, host_paging=True)), 20)
    g = machine.guests[0]
    assert int(g.st[e.S_HOST_SWAP_OUT]) > 0
    assert int(g.st[e.S_DOUBLE_PAGING]) > 0
    assert g.mapped_pages * 4096 <= 121 * MIB


def test_the_balloon_never_causes_double_paging() -> None:
    data = one_guest({"kind": "uniform", "working_set": "240MiB"}, memory="200MiB")
    data["guests"][0]["swap"] = "512MiB"
    machine = run(scenario(data), FixedPolicy({"g": 120}), 20)
    g = machine.guests[0]
    assert int(g.st[e.S_DOUBLE_PAGING]) == 0
    assert int(g.st[e.S_HOST_SWAP_OUT]) == 0


@pytest.mark.parametrize(("better", "worse"), [("lru", "fifo"), ("clock", "fifo")])
def test_the_guest_replacement_policy_matters(better: str, worse: str) -> None:
    def faults(replacement: str) -> int:
        data = one_guest(
            {"kind": "zipf", "working_set": "200MiB", "skew": 0.9}, replacement=replacement
        )
        machine = run(scenario(data), FixedPolicy({"g": 120}), 15)
        return int(machine.guests[0].st[e.S_MAJOR])

    assert faults(better) < faults(worse)


def test_lru_on_a_scan_larger_than_memory_misses_every_time() -> None:
    data = one_guest({"kind": "scan", "working_set": "150MiB"}, replacement="lru")
    sc = scenario(data)
    machine = SimMachine(sc)
    scheduler = Scheduler(machine, FixedPolicy({"g": 128}), period_s=1.0)
    for _ in range(15):  # long enough for the balloon to reach its target
        scheduler.step()
        machine.advance(1.0)
    g = machine.guests[0]
    assert int(g.st[e.S_BALLOON]) * 4096 == 128 * MIB
    refs, faults = int(g.st[e.S_REFS]), int(g.st[e.S_MAJOR])
    for _ in range(3):
        scheduler.step()
        machine.advance(1.0)
    # 112 MiB of frames for a 150 MiB sweep: LRU always evicts the page needed next
    assert int(g.st[e.S_MAJOR]) - faults == int(g.st[e.S_REFS]) - refs > 0


def test_same_seed_same_run_and_another_seed_another_run() -> None:
    def fingerprint(seed: int) -> list[int]:
        data = one_guest({"kind": "zipf", "working_set": "200MiB"})
        data["sim"]["seed"] = seed
        machine = run(scenario(data), FixedPolicy({"g": 120}), 6)
        return [int(x) for x in machine.guests[0].st] + [int(x) for x in machine.guests[0].p2v]

    assert fingerprint(3) == fingerprint(3)
    assert fingerprint(3) != fingerprint(4)


def test_a_lying_balloon_report_is_refused() -> None:
    from balloonist.driver import UnitRange
    from balloonist.errors import GuestProtocolError
    from balloonist.sim.machine import SimBalloonChannel

    machine = SimMachine(scenario(one_guest({"kind": "idle"})))
    channel = SimBalloonChannel(machine.guests[0], machine)
    with pytest.raises(GuestProtocolError):
        channel.report_locked([UnitRange(0, 10)])  # kernel frames, never ballooned
    with pytest.raises(GuestProtocolError):
        channel.report_locked([UnitRange(10**9, 1)])  # beyond the guest's memory


# -- properties over random hosts ---------------------------------------------------------

workloads = st.sampled_from(["idle", "uniform", "zipf", "scan"])


@st.composite
def random_scenarios(draw: st.DrawFn) -> tuple[Scenario, FixedPolicy]:
    n = draw(st.integers(1, 4))
    guests = []
    alloc = {}
    for i in range(n):
        memory = draw(st.integers(32, 96))
        ws = draw(st.integers(4, memory + 32))
        guests.append(
            {
                "name": f"g{i}",
                "memory": f"{memory}MiB",
                "kernel": "8MiB",
                "swap": f"{memory * 2}MiB",
                "replacement": draw(st.sampled_from(["lru", "clock", "fifo"])),
                "workload": {"kind": draw(workloads), "working_set": f"{ws}MiB"},
            }
        )
        alloc[f"g{i}"] = draw(st.integers(8, memory))
    host = draw(st.integers(8 * n + 64, 400))
    data = {
        "host": {"memory": f"{host}MiB", "swap": "256MiB"},
        "sim": {"duration_s": 5, "seed": draw(st.integers(0, 2**32)), "slices_per_period": 2},
        "costs": {"reference_s": 1e-4},
        "guests": guests,
    }
    mech = draw(
        st.sampled_from(
            [
                Mechanisms(balloon=True),
                Mechanisms(balloon=True, host_paging=True),
                Mechanisms(balloon=True, host_paging=True, block_over_target=True),
                Mechanisms(balloon=False, host_paging=True),
            ]
        )
    )
    return scenario(data), FixedPolicy(alloc, mech)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_scenarios())
def test_invariants_hold_on_random_hosts(case: tuple[Scenario, FixedPolicy]) -> None:
    sc, policy = case
    machine = SimMachine(sc)
    scheduler = Scheduler(machine, policy, period_s=sc.period_s)
    for _ in range(5):
        scheduler.step()
        machine.advance(sc.period_s)
        # check_guest: no frame is both pinned by the balloon and backed by machine memory,
        # page tables agree, counts match; check_host: guests never hold more machine
        # memory than the host has, nor more than their limit.
        for g in machine.guests:
            check_guest(g)
        machine.check_host()
        mapped = np.array([g.mapped_pages for g in machine.guests])
        assert mapped.sum() <= machine.host_pages


@pytest.mark.parametrize("protect", [False, True], ids=["plain-host", "ballooned-protected"])
def test_a_host_that_protects_ballooned_guests_never_swaps_them(protect: bool) -> None:
    # One guest's working set appears at once, larger than the host: a plain host swaps
    # its pages behind its back; one that never swaps a guest its balloon serves makes
    # it wait for its balloon instead.
    data = one_guest({"kind": "uniform", "working_set": "200MiB"})
    data["host"] = {"memory": "128MiB", "swap": "512MiB"}
    mechanisms = Mechanisms(balloon=True, host_paging_ballooned=not protect)
    machine = run(scenario(data), FixedPolicy({"g": 100}, mechanisms), periods=10)
    g = machine.guests[0]
    if protect:
        assert g.st[e.S_HOST_SWAP_OUT] == 0 and g.st[e.S_DOUBLE_PAGING] == 0
        assert g.st[e.S_STALLS] > 0  # it waited for memory
        assert g.mapped_pages <= 100 * MIB // 4096 + 1  # its balloon brought it to target
    else:
        assert g.st[e.S_HOST_SWAP_OUT] > 0


def test_a_virtio_mem_guest_is_resized_in_whole_blocks() -> None:
    # The policy asks for 201 MiB: a virtio-mem guest unplugs whole 2 MiB blocks, so it
    # keeps 200 MiB (never more than asked); a ballooned one keeps 201 MiB.
    kept = {}
    for virtio_mem in (False, True):
        sc = scenario(
            one_guest({"kind": "uniform", "working_set": "100MiB"}, virtio_mem=virtio_mem)
        )
        assert sc.guests[0].virtio_mem is virtio_mem
        machine = run(sc, FixedPolicy({"g": 201}), 10)
        g = machine.guests[0]
        assert g.register_pages == int(g.st[e.S_BALLOON])  # the driver got there
        kept[virtio_mem] = (g.frames - g.register_pages) * 4096
    assert kept == {False: 201 * MIB, True: 200 * MIB}
