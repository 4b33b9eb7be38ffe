"""Generator ranges for tests: small guests, seconds-long runs, cheap to simulate."""

from __future__ import annotations

from balloonist.suite.generator import GeneratorParams

TINY = GeneratorParams(
    guests_max=3,
    guest_memory_min_mib=40,
    guest_memory_max_mib=96,
    duration_min_s=3,
    duration_max_s=5,
    ramp_max_s=2.0,
    max_estimated_refs=5e6,
)
