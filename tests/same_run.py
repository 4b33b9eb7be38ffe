"""One check that two simulated runs are the same run: every series, every field."""

from __future__ import annotations

import dataclasses

import numpy as np

from balloonist.sim.result import SimResult


def assert_same_run(a: SimResult, b: SimResult) -> None:
    assert a.summary() == b.summary()
    for field in dataclasses.fields(SimResult):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, np.ndarray):
            assert np.array_equal(x, y), field.name
    for ga, gb in zip(a.guests + a.cpus, b.guests + b.cpus, strict=True):
        for field in dataclasses.fields(ga):
            x, y = getattr(ga, field.name), getattr(gb, field.name)
            same = np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
            assert same, (ga.name, field.name)
