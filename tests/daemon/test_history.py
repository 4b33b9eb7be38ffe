"""The daemon's history ring: what it keeps, in what order, and what ``since`` gives."""

from __future__ import annotations

from dataclasses import replace

import pytest

from balloonist.daemon.history import History, point_of
from tests.api.fake import make_guest, make_status


def test_a_point_keeps_the_charted_figures_in_guest_order() -> None:
    status = make_status(7)
    point = point_of(status)
    assert point.version == 7 and point.time_s == status.time_s
    assert point.names == ("web", "db")
    assert point.host_memory_bytes == status.host.memory_bytes
    assert point.host_free_bytes == status.host.free_bytes
    assert point.host_state == "soft"
    assert point.allocated_bytes == tuple(g.allocated_bytes for g in status.guests)
    assert point.balloon_target_bytes == tuple(g.balloon_target_bytes for g in status.guests)
    assert point.working_set_bytes == tuple(g.working_set_bytes for g in status.guests)


def test_since_gives_newer_points_oldest_first() -> None:
    history = History()
    for version in range(1, 6):
        history.record(make_status(version))
    assert [p.version for p in history.since()] == [1, 2, 3, 4, 5]
    assert [p.version for p in history.since(3)] == [4, 5]
    assert history.since(5) == ()
    assert history.since(99) == ()


def test_old_points_fall_off_at_capacity() -> None:
    history = History(capacity=3)
    for version in range(1, 8):
        history.record(make_status(version))
    assert [p.version for p in history.since()] == [5, 6, 7]
    assert [p.version for p in history.since(1)] == [5, 6, 7]


def test_points_share_the_names_while_the_guests_stay_the_same() -> None:
    history = History()
    history.record(make_status(1))
    history.record(make_status(2))
    history.record(make_status(3, guests=(make_guest("web"),)))
    first, second, third = history.since()
    assert first.names is second.names
    assert third.names == ("web",)


@pytest.mark.parametrize("version", [3, 2])
def test_a_version_that_is_not_newer_is_refused(version: int) -> None:
    history = History()
    history.record(make_status(3))
    with pytest.raises(ValueError, match="not after"):
        history.record(replace(make_status(3), version=version))
    assert len(history.since()) == 1


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        History(capacity=0)
