"""The suite page's account of what the suite cost."""

from __future__ import annotations

from typing import Any

from balloonist.suite.page import _times


def test_one_run_gives_its_wall_and_cpu_time() -> None:
    meta: dict[str, Any] = {"wall_s": 1647.0, "cpu_s": 3267.0, "slices": [{}]}
    assert _times(meta) == "27.4 min wall, 54 CPU min"


def test_slices_sum_their_times_and_a_slice_without_a_wall_time_leaves_none() -> None:
    summed: dict[str, Any] = {"wall_s": 1200.0, "cpu_s": 2400.0, "slices": [{}, {}]}
    assert _times(summed) == "2 slices, their times summed, 20.0 min wall, 40 CPU min"
    unknown: dict[str, Any] = {"wall_s": None, "cpu_s": 2400.0, "slices": [{}, {}, {}]}
    assert _times(unknown) == (
        "3 slices, their times summed, no wall time (a slice was taken out of a longer run), "
        "40 CPU min"
    )
