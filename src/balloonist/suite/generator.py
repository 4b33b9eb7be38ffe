"""A seeded generator of overcommitted hosts: the scenarios policies are judged on.

Pure: nothing here runs the simulator. Scenario ``index`` of ``seed`` is drawn from its
own ``SeedSequence(seed, spawn_key=(index,))``, so it is the same whatever ``count`` is.
Every scenario is built as a TOML-able dict and validated through
:func:`balloonist.sim.scenario.scenario_from_dict`, so ``scenarios/*.toml`` written
from these dicts rerun with ``balloonist simulate``.

Cost bound. A guest that hits in memory completes ``1 / reference_s`` (1 M) references
per simulated second and the simulator costs about one CPU second per 30 M references,
so a run costs roughly (active guest-seconds) / 30 CPU seconds. Each scenario's
estimate, every non-idle guest-second at the hit rate (an upper bound: faults slow a
guest down), is held under ``GeneratorParams.max_estimated_refs``: first by
shortening the run (not below ``duration_min_s``), then, for hosts of many guests, by
turning the last guests idle (many-guest hosts are mostly idle guests anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from balloonist.sim.scenario import Scenario, scenario_from_dict

__all__ = [
    "SHAPES",
    "GeneratedScenario",
    "GeneratorParams",
    "generate",
    "generate_dicts",
    "generate_one",
    "scenario_name",
]

#: How a guest's workload changes over the run.
SHAPES: Final = ("steady", "idle", "growth", "shrink", "drift", "burst", "periodic", "jump")
KINDS: Final = ("uniform", "zipf", "scan")
REPLACEMENTS: Final = ("lru", "clock", "fifo")
_MIB: Final = 1024 * 1024
_KERNEL_MIB: Final = 16  # the schema's default guest kernel


@dataclass(frozen=True)
class GeneratorParams:
    """Every range the generator draws from; each with why."""

    # Guests per host: 2 shows sharing; 16 is a dense host; cost grows with guests.
    guests_min: int = 2
    guests_max: int = 16
    # P(n guests) ~ n**-guests_skew: most hosts small (cheap), a few dense ones.
    guests_skew: float = 1.5
    # Configured memory per guest, whole MiB, log-uniform: small appliances to big VMs.
    guest_memory_min_mib: int = 128
    guest_memory_max_mib: int = 4096
    # Configured memory / host memory: 1.2 is mild, 3x is an aggressive consolidation.
    overcommit_min: float = 1.2
    overcommit_max: float = 3.0
    # Host swap as a multiple of configured memory: generous, host paging never stalls.
    host_swap_factor: float = 2.0
    # Run length: long enough for several phase changes and for balloons to settle.
    duration_min_s: int = 60
    duration_max_s: int = 180
    # Workload sizes relative to the guest's fair share of host memory (by shares):
    # from a small hot set to more than the guest can hold with its share.
    ws_share_min: float = 0.1
    ws_share_max: float = 2.5
    # ...and never above this fraction of the guest's own usable memory.
    ws_memory_cap: float = 0.95
    zipf_skew_min: float = 0.6  # flat enough to need most of the working set
    zipf_skew_max: float = 1.4  # a sharp hot set
    ramp_max_s: float = 60.0  # slow growth a balloon can follow
    p_no_ramp: float = 0.4  # working sets that appear at once
    # Largest shares ratio within a host (1:1 .. 1:max); P(all equal) otherwise.
    shares_ratio_max: float = 8.0
    p_equal_shares: float = 0.3
    p_reservation: float = 0.2  # a guest with a `min`
    p_limit: float = 0.15  # a guest with a `max`
    # Scenarios with guests that have no balloon driver: a minority, as on real hosts.
    p_no_balloon_scenario: float = 0.2
    # Relative weights of the workload shapes (SHAPES order).
    shape_weights: tuple[float, ...] = (3.0, 1.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    # References a hitting guest completes per simulated second (1 / default reference_s).
    hit_refs_per_s: float = 1e6
    # Cost cap per run (see module doc): ~9 CPU s today at 100 M hit refs per CPU s,
    # ~3 s once the simulator is 3x faster; the mean run costs well under the cap.
    max_estimated_refs: float = 9e8

    def __post_init__(self) -> None:
        if not 1 <= self.guests_min <= self.guests_max:
            raise ValueError("need 1 <= guests_min <= guests_max")
        if not 16 < self.guest_memory_min_mib <= self.guest_memory_max_mib:
            raise ValueError("need 16 < guest_memory_min_mib <= guest_memory_max_mib")
        if not 1.0 <= self.overcommit_min <= self.overcommit_max:
            raise ValueError("need 1 <= overcommit_min <= overcommit_max")
        if not 1 <= self.duration_min_s <= self.duration_max_s:
            raise ValueError("need 1 <= duration_min_s <= duration_max_s")
        if len(self.shape_weights) != len(SHAPES):
            raise ValueError(f"shape_weights needs {len(SHAPES)} weights")


@dataclass(frozen=True)
class GeneratedScenario:
    """One generated host: its TOML-able dict and the validated scenario built from it."""

    index: int
    data: dict[str, Any]
    scenario: Scenario
    shapes: tuple[str, ...]  # each guest's workload shape, in guest order
    estimated_refs: float  # the cost bound's estimate (see module doc)


def scenario_name(seed: int, index: int) -> str:
    return f"suite-{seed}-{index}"


def generate(count: int, seed: int, params: GeneratorParams | None = None) -> list[Scenario]:
    """``count`` validated scenarios; the same ``seed`` gives the same scenarios."""
    return [g.scenario for g in _generate_all(count, seed, params or GeneratorParams())]


def generate_dicts(
    count: int, seed: int, params: GeneratorParams | None = None
) -> list[dict[str, Any]]:
    """The same scenarios as :func:`generate`, as TOML-able dicts."""
    return [g.data for g in _generate_all(count, seed, params or GeneratorParams())]


def _generate_all(count: int, seed: int, params: GeneratorParams) -> list[GeneratedScenario]:
    if count < 0:
        raise ValueError("count must be >= 0")
    return [generate_one(seed, i, params) for i in range(count)]


def generate_one(seed: int, index: int, params: GeneratorParams | None = None) -> GeneratedScenario:
    """Scenario ``index`` of ``seed``, independent of how many others are drawn."""
    p = params or GeneratorParams()
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
    host = _draw_host(rng, p)
    guests = [_draw_guest(rng, p, host, i) for i in range(host.n)]
    duration_s, estimate = _bound_cost(rng, p, guests)
    sim_seed = int(rng.integers(1, 2**31))  # the simulator's own random choices
    name = scenario_name(seed, index)
    data: dict[str, Any] = {
        "name": name,
        "description": _describe(host, guests, duration_s),
        "host": {
            "memory": f"{host.memory_mib}MiB",
            "swap": f"{round(host.configured_mib * p.host_swap_factor)}MiB",
        },
        "sim": {"duration_s": float(duration_s), "period_s": 1.0, "seed": sim_seed},
        "guests": [_guest_dict(g, duration_s) for g in guests],
    }
    scenario = scenario_from_dict(data, where=name, default_name=name)
    return GeneratedScenario(
        index=index,
        data=data,
        scenario=scenario,
        shapes=tuple(g.shape for g in guests),
        estimated_refs=estimate,
    )


# ---------------------------------------------------------------------------------------
# Drawing


@dataclass(frozen=True)
class _Host:
    n: int
    memory_mib: int
    configured_mib: int
    overcommit: float
    memories_mib: tuple[int, ...]
    shares: tuple[int, ...]
    no_balloon: frozenset[int]


@dataclass
class _Guest:
    """A guest being drawn; phases are (start fraction of the run, workload dict)."""

    index: int
    memory_mib: int
    shares: int
    fair_mib: float  # its share of host memory, by shares
    replacement: str
    balloon: bool
    min_mib: int
    max_mib: int | None
    shape: str
    phases: list[tuple[float, dict[str, Any]]]


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _draw_host(rng: np.random.Generator, p: GeneratorParams) -> _Host:
    counts = np.arange(p.guests_min, p.guests_max + 1)
    weights = counts.astype(float) ** -p.guests_skew
    n = int(rng.choice(counts, p=weights / weights.sum()))
    memories = tuple(
        round(_log_uniform(rng, p.guest_memory_min_mib, p.guest_memory_max_mib)) for _ in range(n)
    )
    configured = sum(memories)
    overcommit = float(rng.uniform(p.overcommit_min, p.overcommit_max))
    memory_mib = max(64, round(configured / overcommit))
    ratio = 1.0
    if rng.random() >= p.p_equal_shares:
        ratio = _log_uniform(rng, 1.0, p.shares_ratio_max)
    # The first two guests take the ends of the range, so the ratio drawn is the ratio.
    exponents = [0.0, 1.0, *rng.uniform(0.0, 1.0, size=n - 2)][:n]
    order = rng.permutation(n)
    shares = tuple(round(1000 * ratio ** exponents[int(k)]) for k in order)
    no_balloon: frozenset[int] = frozenset()
    if rng.random() < p.p_no_balloon_scenario:
        k = int(rng.integers(1, max(1, n // 2) + 1))
        no_balloon = frozenset(int(i) for i in rng.choice(n, size=k, replace=False))
    return _Host(
        n=n,
        memory_mib=memory_mib,
        configured_mib=configured,
        overcommit=configured / memory_mib,
        memories_mib=memories,
        shares=shares,
        no_balloon=no_balloon,
    )


def _draw_guest(rng: np.random.Generator, p: GeneratorParams, host: _Host, i: int) -> _Guest:
    memory = host.memories_mib[i]
    fair = host.memory_mib * host.shares[i] / sum(host.shares)
    min_mib = 0
    if rng.random() < p.p_reservation:
        # At most half the fair share, so all reservations fit in host memory.
        min_mib = int(min(memory, fair) * rng.uniform(0.1, 0.5))
    max_mib: int | None = None
    if rng.random() < p.p_limit:
        max_mib = max(min_mib, round(memory * rng.uniform(0.5, 0.9)))
    weights = np.array(p.shape_weights)
    if i == 0:  # every host has at least one guest that works
        weights[SHAPES.index("idle")] = 0.0
    shape = str(rng.choice(SHAPES, p=weights / weights.sum()))
    guest = _Guest(
        index=i,
        memory_mib=memory,
        shares=host.shares[i],
        fair_mib=fair,
        replacement=str(rng.choice(REPLACEMENTS)),
        balloon=i not in host.no_balloon,
        min_mib=min_mib,
        max_mib=max_mib,
        shape=shape,
        phases=[],
    )
    guest.phases = _draw_phases(rng, p, guest)
    return guest


def _ws_mib(rng: np.random.Generator, p: GeneratorParams, g: _Guest, scale: float = 1.0) -> int:
    """A working set relative to the guest's fair share, capped by its usable memory."""
    cap = (g.memory_mib - _KERNEL_MIB) * p.ws_memory_cap
    ws = _log_uniform(rng, p.ws_share_min, p.ws_share_max) * g.fair_mib * scale
    return max(1, round(min(ws, cap)))


def _active(
    rng: np.random.Generator,
    p: GeneratorParams,
    ws_mib: int,
    offset_mib: int = 0,
    ramp: bool = True,
) -> dict[str, Any]:
    kind = str(rng.choice(KINDS))
    w: dict[str, Any] = {"kind": kind, "working_set": f"{ws_mib}MiB"}
    if kind == "zipf":
        w["skew"] = round(float(rng.uniform(p.zipf_skew_min, p.zipf_skew_max)), 2)
    if offset_mib:
        w["offset"] = f"{offset_mib}MiB"
    if ramp and rng.random() >= p.p_no_ramp:
        w["ramp_s"] = round(float(rng.uniform(0.0, p.ramp_max_s)), 1)
    return w


Phases = list[tuple[float, dict[str, Any]]]


def _draw_phases(rng: np.random.Generator, p: GeneratorParams, g: _Guest) -> Phases:
    cut = float(rng.uniform(0.25, 0.6))  # where a two-phase shape changes
    return _SHAPES.get(g.shape, _jump)(rng, p, g, cut)


def _steady(rng: np.random.Generator, p: GeneratorParams, g: _Guest, cut: float) -> Phases:
    return [(0.0, _active(rng, p, _ws_mib(rng, p, g)))]


def _idle(rng: np.random.Generator, p: GeneratorParams, g: _Guest, cut: float) -> Phases:
    return [(0.0, {"kind": "idle"})]


def _resize(rng: np.random.Generator, p: GeneratorParams, g: _Guest, cut: float) -> Phases:
    """Growth or shrink: one working set, then another of the same kind."""
    small, large = sorted((_ws_mib(rng, p, g, 0.3), _ws_mib(rng, p, g, 1.5)))
    first, second = (small, large) if g.shape == "growth" else (large, small)
    a = _active(rng, p, first)
    b = {**_active(rng, p, second), "kind": a["kind"], "skew": a.get("skew", 1.0)}
    return [(0.0, a), (cut, b)]


def _drift(rng: np.random.Generator, p: GeneratorParams, g: _Guest, cut: float) -> Phases:
    ws = _ws_mib(rng, p, g)
    steps = int(rng.integers(2, 5))
    # How far the hot set moves; the last offset stays within the guest's swap.
    step_mib = max(1, min(round(ws * rng.uniform(0.2, 1.0)), 2 * g.memory_mib // steps))
    base = _active(rng, p, ws)
    return [(k / steps, {**base, "offset": f"{k * step_mib}MiB"}) for k in range(steps)]


def _burst(rng: np.random.Generator, p: GeneratorParams, g: _Guest, cut: float) -> Phases:
    return [(0.0, _active(rng, p, _ws_mib(rng, p, g))), (cut, {"kind": "idle"})]


def _periodic(rng: np.random.Generator, p: GeneratorParams, g: _Guest, cut: float) -> Phases:
    cycles = int(rng.integers(2, 5))
    busy, idle = _active(rng, p, _ws_mib(rng, p, g), ramp=False), {"kind": "idle"}
    return [(k / (2 * cycles), busy if k % 2 == 0 else idle) for k in range(2 * cycles)]


def _jump(rng: np.random.Generator, p: GeneratorParams, g: _Guest, cut: float) -> Phases:
    """A large new working set at once, faster than a balloon can move."""
    small = _ws_mib(rng, p, g, 0.3)
    large = _ws_mib(rng, p, g, 2.0)
    return [(0.0, _active(rng, p, small)), (cut, _active(rng, p, large, small, False))]


_SHAPES: Final = {
    "steady": _steady,
    "idle": _idle,
    "growth": _resize,
    "shrink": _resize,
    "drift": _drift,
    "burst": _burst,
    "periodic": _periodic,
}


def _active_fraction(g: _Guest) -> float:
    """Fraction of the run the guest's workload references anything."""
    ends = [start for start, _ in g.phases[1:]] + [1.0]
    return sum(
        end - start for (start, w), end in zip(g.phases, ends, strict=True) if w["kind"] != "idle"
    )


def _bound_cost(
    rng: np.random.Generator, p: GeneratorParams, guests: list[_Guest]
) -> tuple[int, float]:
    """The run's duration, shortened (and guests idled) to keep the estimate in budget."""
    duration = int(rng.integers(p.duration_min_s, p.duration_max_s + 1))

    def estimate(d: int) -> float:
        return sum(_active_fraction(g) for g in guests) * d * p.hit_refs_per_s

    if estimate(duration) > p.max_estimated_refs:
        per_s = estimate(1)
        duration = max(p.duration_min_s, math.floor(p.max_estimated_refs / per_s))
    for g in reversed(guests[1:]):
        if estimate(duration) <= p.max_estimated_refs:
            break
        g.shape, g.phases = "idle", [(0.0, {"kind": "idle"})]
    return duration, estimate(duration)


# ---------------------------------------------------------------------------------------
# Writing out


def _guest_dict(g: _Guest, duration_s: int) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": f"g{g.index}",
        "memory": f"{g.memory_mib}MiB",
        "shares": g.shares,
        "replacement": g.replacement,
    }
    if g.min_mib:
        d["min"] = f"{g.min_mib}MiB"
    if g.max_mib is not None:
        d["max"] = f"{g.max_mib}MiB"
    if not g.balloon:
        d["balloon"] = False
    if len(g.phases) == 1:
        d["workload"] = g.phases[0][1]
    else:
        # Whole seconds; a phase that would start at the same second as the last is dropped.
        phases: list[dict[str, Any]] = []
        for start, w in g.phases:
            at_s = float(round(start * duration_s))
            if not phases or at_s > phases[-1]["at_s"]:
                phases.append({"at_s": at_s, "workload": w})
        d["workload"] = {"kind": "phases", "phases": phases}
    return d


def _describe_guest(g: _Guest) -> str:
    kinds = sorted({w["kind"] for _, w in g.phases if w["kind"] != "idle"})
    sizes = [w["working_set"] for _, w in g.phases if "working_set" in w]
    extra = "".join(
        (
            f" min {g.min_mib}MiB" if g.min_mib else "",
            f" max {g.max_mib}MiB" if g.max_mib is not None else "",
            " no balloon" if not g.balloon else "",
        )
    )
    what = f"{'/'.join(kinds)} {'->'.join(sizes)}" if kinds else "nothing"
    return f"g{g.index} {g.memory_mib}MiB x{g.shares} {g.replacement}{extra}: {g.shape} {what}"


def _describe(host: _Host, guests: list[_Guest], duration_s: int) -> str:
    ratio = max(host.shares) / min(host.shares)
    head = (
        f"{host.n} guests, {host.configured_mib}MiB configured on a {host.memory_mib}MiB host "
        f"({host.overcommit:.2f}x), shares up to 1:{ratio:.1f}, {duration_s} s"
    )
    return "; ".join([head, *(_describe_guest(g) for g in guests)])
