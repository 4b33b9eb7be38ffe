"""Instant, free balloon moves: the simulator mode in which the oracle runs.

With ``MoveModel.INSTANT`` each guest's balloon goes straight to its target at the
start of every period: no rate pacing, no balloon driver (a guest configured without
one gets a balloon too: the oracle is a bound, not a policy), and no time charged to
the guest for the balloon's pages or the evictions it forces. The pages still go
through the guest OS (its free list first, then its own replacement and swap) and the
VMM, so every state invariant holds; what the guest later faults back in it pays for
as usual.

The oracle also knows each guest's whole plan, so when a phase begins the mover drops
the pages no later phase will touch (``discard_dead``), as a process that frees its
memory does: a bound should not pay to swap out memory that is never used again.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from balloonist.errors import SimulationError
from balloonist.sim import engine as e
from balloonist.sim.scenario import SimGuest

I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]
I8 = npt.NDArray[np.int8]


class MoveModel(enum.Enum):
    """How balloons reach their targets."""

    PACED = "paced"  # the balloon driver, at the adaptive rate, time charged (default)
    INSTANT = "instant"  # straight to target, free (the oracle's bound only)


class GuestPages(Protocol):
    """What the mover touches of a simulated guest (``guest_memory.GuestMemory``)."""

    guest: SimGuest
    frames: int
    st: I64
    v2p: I32
    vswap: I8
    p2v: I32
    pstate: I8
    stamp: I64
    oldest: I32
    refbit: I8
    free: I32
    rng: npt.NDArray[np.uint64]
    costs: npt.NDArray[np.float64]
    balloon_swap_outs: int

    def discard(self, ranges: Iterable[tuple[int, int]], time_s: float) -> int: ...


class InstantMover:
    """Holds each guest's ballooned frames and moves them to target in one step."""

    def __init__(self, guests: Sequence[GuestPages]) -> None:
        self._guests = list(guests)
        self._held: list[I64] = [np.empty(0, dtype=np.int64) for _ in guests]

    def balloon_pages(self, index: int) -> int:
        return int(self._held[index].size)

    def step(self, balloon_pages: I64, host: I64, limits: Sequence[I64]) -> None:
        """Balloons to their targets (never into the kernel): inflations first, so the
        memory they free is there before any guest's balloon gives frames back.
        """
        goals = [
            min(max(int(b), 0), m.frames - m.guest.kernel_pages)
            for m, b in zip(self._guests, balloon_pages, strict=True)
        ]
        for i, goal in enumerate(goals):
            if goal > self._held[i].size:
                self._inflate(i, goal - self._held[i].size, host, limits[i])
        for i, goal in enumerate(goals):
            if goal < self._held[i].size:
                self._deflate(i, self._held[i].size - goal)

    def discard_dead(self, i: int, phase_index: int, time_s: float) -> int:
        """Guest ``i`` drops what its plan never touches again from phase
        ``phase_index`` on, at ``time_s``; returns the frames freed."""
        m = self._guests[i]
        return m.discard(m.guest.plan.dead_ranges(phase_index), time_s)

    def _inflate(self, i: int, want: int, host: I64, lim: I64) -> None:
        m = self._guests[i]
        out = np.empty(want, dtype=np.int64)
        swap_outs_before = int(m.st[e.S_GUEST_SWAP_OUT])
        got, _spent_s = e.balloon_allocate(
            want, math.inf, out, m.st, m.v2p, m.vswap, m.p2v, m.pstate, m.stamp, m.oldest,
            int(m.guest.replacement), m.rng, host, lim, m.guest.swap_pages, m.costs, m.free,
            m.refbit,
        )  # fmt: skip
        m.balloon_swap_outs += int(m.st[e.S_GUEST_SWAP_OUT]) - swap_outs_before
        frames = out[:got]
        if e.vmm_reclaim(frames, m.st, m.p2v, m.pstate, host) < 0:
            raise SimulationError(f"{m.guest.name}: instant balloon pinned frames it lacks")
        self._held[i] = np.concatenate((self._held[i], frames))

    def _deflate(self, i: int, count: int) -> None:
        m = self._guests[i]
        held = self._held[i]
        frames = held[held.size - count :]  # newest first, as the driver gives them back
        if e.balloon_free(frames, m.st, m.p2v, m.free) < 0:
            raise SimulationError(f"{m.guest.name}: instant balloon freed frames it lacks")
        self._held[i] = held[: held.size - count]
