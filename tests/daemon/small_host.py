"""A small overcommitted host for the daemon's and the dashboard's tests."""

from __future__ import annotations

import tomllib

from balloonist.sim.scenario import Scenario, scenario_from_dict
from balloonist.units import MIB

#: Three 256 MiB guests on a 512 MiB host: overcommitted, so balloons move. References
#: are made expensive so a simulated second costs little wall time.
SMALL = """\
name = "small"

[host]
memory = "512MiB"
swap = "1GiB"

[sim]
duration_s = 60.0
period_s = 1.0

[costs]
reference_s = 2e-5

[[guests]]
name = "busy"
memory = "256MiB"
workload = { kind = "zipf", working_set = "200MiB", skew = 0.8 }

[[guests]]
name = "idle"
memory = "256MiB"

[guests.workload]
kind = "phases"
phases = [
    { at_s = 0.0, workload = { kind = "scan", working_set = "150MiB" } },
    { at_s = 5.0, workload = { kind = "idle" } },
]

[[guests]]
name = "small"
memory = "256MiB"
workload = { kind = "uniform", working_set = "60MiB" }
"""
GUESTS = ("busy", "idle", "small")
MEMORY = 256 * MIB


def small() -> Scenario:
    return scenario_from_dict(tomllib.loads(SMALL), where="small", default_name="small")
