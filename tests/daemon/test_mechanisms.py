"""Where the memory the host got back came from: the host's count of each VM's RAM,
its fall put down to sharing, then ballooning, the rest to the guest's reporting."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from balloonist.daemon.mechanisms import ORDER, Freed, Mechanism, freed_between, freed_by_vm
from balloonist.model import HostHeld
from balloonist.units import GIB, MIB
from tests.daemon.fakes import FakeMemoryHost, FakeVm, make

S, R, B, H = Mechanism.SHARING, Mechanism.REPORTING, Mechanism.BALLOONING, Mechanism.HOST_PAGING


@dataclass(frozen=True)
class Vm:
    name: str
    balloon_bytes: int
    host: HostHeld | None


def vm(
    ram_mib: int,
    balloon_mib: int = 0,
    saved_mib: int | None = None,
    name: str = "a",
    swapped_mib: int | None = None,
) -> Vm:
    saved = None if saved_mib is None else saved_mib * MIB
    swapped = None if swapped_mib is None else swapped_mib * MIB
    host = HostHeld(ram_mib * MIB + 50 * MIB, ram_mib * MIB, None, saved, swapped_bytes=swapped)
    return Vm(name, balloon_mib * MIB, host)


def mib(freed: dict[Mechanism, int]) -> dict[str, int]:
    return {str(m): v // MIB for m, v in freed.items()}


def test_a_fall_with_no_balloon_move_and_no_sharing_is_the_guest_s_reporting() -> None:
    assert mib(freed_by_vm(vm(400), vm(200))) == {
        "sharing": 0,
        "free_page_reporting": 200,
        "ballooning": 0,
        "host_paging": 0,
    }


def test_sharing_first_then_the_balloon_then_the_rest() -> None:
    freed = freed_by_vm(vm(400, balloon_mib=100, saved_mib=10), vm(250, 150, saved_mib=40))
    assert mib(freed) == {
        "sharing": 30,
        "free_page_reporting": 70,
        "ballooning": 50,
        "host_paging": 0,
    }


def test_what_went_to_the_host_s_swap_is_host_paging_as_far_as_the_fall_goes() -> None:
    paged = freed_by_vm(vm(400, swapped_mib=10), vm(300, swapped_mib=70))
    assert mib(paged) == {
        "sharing": 0,
        "free_page_reporting": 40,
        "ballooning": 0,
        "host_paging": 60,
    }
    # Swap that grew while the host's count did not fall freed nothing more.
    assert sum(freed_by_vm(vm(300, swapped_mib=0), vm(300, swapped_mib=50)).values()) == 0


def test_a_balloon_that_takes_pages_already_given_back_frees_nothing_more() -> None:
    # The balloon grew by 100 MiB, but the host's count fell by 20 only.
    assert mib(freed_by_vm(vm(400, 100), vm(380, 200))) == {
        "sharing": 0,
        "free_page_reporting": 0,
        "ballooning": 20,
        "host_paging": 0,
    }


def test_a_vm_that_grew_or_cannot_be_counted_freed_nothing() -> None:
    assert sum(freed_by_vm(vm(200, 100), vm(300, 150)).values()) == 0
    uncounted = Vm("a", 0, None)
    assert sum(freed_by_vm(uncounted, vm(100)).values()) == 0


@given(
    st.lists(
        st.tuples(st.integers(0, 4000), st.integers(0, 4000), st.integers(0, 900)),
        min_size=2,
        max_size=2,
    )
)
def test_the_parts_never_add_up_to_more_than_the_host_got_back(
    periods: list[tuple[int, int, int]],
) -> None:
    (ram0, balloon0, saved0), (ram1, balloon1, saved1) = periods
    freed = freed_by_vm(vm(ram0, balloon0, saved0), vm(ram1, balloon1, saved1))
    assert all(v >= 0 for v in freed.values())
    assert sum(freed.values()) == max(0, ram0 - ram1) * MIB


def test_vms_are_summed_and_the_record_keeps_a_total() -> None:
    before = [vm(400, name="a"), vm(300, name="b"), vm(100, name="gone")]
    after = [vm(300, name="a"), vm(250, 50, name="b"), vm(100, name="new")]
    period = freed_between(before, after)
    assert mib(period) == {
        "sharing": 0,
        "free_page_reporting": 100,
        "ballooning": 50,
        "host_paging": 0,
    }
    record = Freed().then(period).then(period)
    assert record.period_bytes == period
    assert {m: record.total_bytes[m] for m in ORDER} == {m: 2 * period[m] for m in ORDER}


def test_the_daemon_records_what_each_period_freed(tmp_path: Path) -> None:
    vms = {"web": FakeVm(2 * GIB, 2 * GIB), "db": FakeVm(GIB, GIB)}
    memory = FakeMemoryHost({1000: HostHeld(1100 * MIB, 1000 * MIB)})  # web's QEMU
    daemon = make(tmp_path, vms, budget="3GiB", memory_host=memory)
    daemon.step()
    status = daemon.status()
    assert status is not None and status.freed is not None
    assert sum(status.freed.total_bytes.values()) == 0
    web_before = status.guest("web")
    memory.counts[1000] = HostHeld(800 * MIB, 700 * MIB)  # web gave 300 MiB back
    daemon.step()
    status = daemon.status()
    assert status is not None and status.freed is not None
    web_after = status.guest("web")
    assert web_before is not None and web_after is not None
    # Its balloon grew a little too this period: that part is the balloon's.
    grew = web_after.balloon_bytes - web_before.balloon_bytes
    assert status.freed.period_bytes[B] == grew
    assert status.freed.period_bytes[R] == 300 * MIB - grew
    reported = status.freed.period_bytes[R]
    daemon.step()
    status = daemon.status()
    assert status is not None and status.freed is not None
    assert status.freed.period_bytes[R] == 0 and status.freed.total_bytes[R] == reported
    # Without the host's count there is nothing to put down: no record at all.
    plain = make(tmp_path / "plain", {"web": FakeVm(2 * GIB, 2 * GIB)})
    plain.step()
    plain_status = plain.status()
    assert plain_status is not None and plain_status.freed is None
