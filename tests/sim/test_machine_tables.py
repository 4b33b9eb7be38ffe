"""The machine's array helpers: frame ranges to and from numpy, and the zipf alias table.

The numpy versions must give exactly what the driver's own list-based helpers give:
the balloon driver keeps the ranges in order, and which frames deflate first depends
on it.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from balloonist.driver import UnitRange, ranges_from_units
from balloonist.sim.guest_memory import zipf_alias
from balloonist.sim.machine import _ranges_of, _ranges_to_frames
from balloonist.sim.workload import Workload, WorkloadKind

frame_lists = st.lists(st.integers(min_value=0, max_value=300), max_size=200)
range_lists = st.lists(
    st.builds(UnitRange, st.integers(min_value=0, max_value=10_000), st.integers(1, 40)),
    max_size=50,
)


@given(frame_lists)
def test_ranges_of_matches_the_drivers_ranges(frames: list[int]) -> None:
    array = np.array(frames, dtype=np.int64)
    assert _ranges_of(array) == ranges_from_units(frames)


@given(range_lists)
def test_ranges_to_frames_lists_every_frame_in_order(ranges: list[UnitRange]) -> None:
    expected = [f for r in ranges for f in range(r.start, r.end)]
    frames = _ranges_to_frames(ranges)
    assert frames.dtype == np.int64
    assert frames.tolist() == expected


@given(frame_lists)
def test_frames_survive_a_round_trip(frames: list[int]) -> None:
    array = np.array(frames, dtype=np.int64)
    assert _ranges_to_frames(_ranges_of(array)).tolist() == sorted(set(frames))


def test_zipf_alias_table_rows_give_each_rank_its_zipf_weight() -> None:
    pages, skew = 500, 0.9
    table = zipf_alias(
        Workload(kind=WorkloadKind.ZIPF, working_set_pages=pages, offset_pages=0, skew=skew)
    )
    assert table.shape == (pages, 2)
    prob, alias = table[:, 0], table[:, 1].astype(np.int64)
    assert np.array_equal(alias, table[:, 1])  # alias ranks are whole numbers
    # Rank i is drawn when row i keeps itself, or another row's coin sends it to i.
    chance = prob.copy()
    np.add.at(chance, alias, 1.0 - prob)
    weights = np.arange(1, pages + 1, dtype=np.float64) ** -skew
    np.testing.assert_allclose(chance / pages, weights / weights.sum(), rtol=1e-9)
