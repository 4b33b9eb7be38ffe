"""The queue of operators' changes, alone: checked when asked, taken whole, once."""

from __future__ import annotations

import pytest

from balloonist.daemon.changes import ChangeQueue
from balloonist.daemon.control import GuestChange
from balloonist.errors import ConfigError
from balloonist.model import GuestSpec
from balloonist.units import GIB, MIB


def queue() -> ChangeQueue:
    q = ChangeQueue()
    specs = {n: GuestSpec(n, 2 * GIB, 256 * MIB, 2 * GIB, 1000) for n in ("a", "b")}
    q.update(specs, capacity_bytes=3 * GIB)
    return q


def test_changes_wait_for_the_loop_and_are_taken_once_merged() -> None:
    q = queue()
    q.guest("a", GuestChange(min_bytes=512 * MIB))
    q.guest("a", GuestChange(shares=2000))
    q.tax_rate(0.5)
    taken = q.take()
    assert taken.guests == {"a": GuestChange(min_bytes=512 * MIB, shares=2000)}
    assert taken.tax_rate == 0.5
    again = q.take()
    assert (dict(again.guests), again.tax_rate) == ({}, None)


def test_a_bad_change_names_its_field_and_queues_nothing() -> None:
    q = queue()
    q.guest("b", GuestChange(min_bytes=1536 * MIB))
    with pytest.raises(ConfigError) as caught:  # 1.5 GiB queued for b + 1.75 GiB > 3 GiB
        q.guest("a", GuestChange(min_bytes=1792 * MIB))
    assert caught.value.field == "min_bytes"
    with pytest.raises(ConfigError) as unknown:
        q.guest("c", GuestChange(shares=5))
    assert unknown.value.field == "name"
    for bad in (1.0, -0.1, True):
        with pytest.raises(ConfigError) as tax:
            q.tax_rate(bad)
        assert tax.value.field == "tax_rate"
    taken = q.take()
    assert (dict(taken.guests), taken.tax_rate) == ({"b": GuestChange(min_bytes=1536 * MIB)}, None)


def test_a_guest_no_longer_managed_loses_its_queued_change() -> None:
    q = queue()
    q.guest("a", GuestChange(shares=3))
    q.update({"b": GuestSpec("b", 2 * GIB, 256 * MIB, 2 * GIB, 1000)}, capacity_bytes=3 * GIB)
    assert dict(q.take().guests) == {}
