"""Fakes more than one package of tests uses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from balloonist.driver import UnitRange, ranges_from_units
from balloonist.errors import GuestProtocolError, Violation
from balloonist.model import Decision, GuestTarget, Snapshot
from balloonist.policy import Policy


class FakeKernel:
    """A guest kernel's page allocator: frames from a pool, lowest first, from
    ``first_frame`` on; ``limit`` caps one allocation. It records each request's size in
    ``calls``, each free in ``events``, and refuses a free of a page it never gave out."""

    def __init__(
        self,
        frames: int = 1 << 20,
        *,
        limit: int | None = None,
        first_frame: int = 0,
        events: list[str] | None = None,
    ) -> None:
        self.free = list(range(first_frame + frames - 1, first_frame - 1, -1))
        self.held: set[int] = set()
        self.limit = limit
        self.calls: list[int] = []
        self.events = events if events is not None else []

    def allocate_units(self, count: int) -> list[UnitRange]:
        self.calls.append(count)
        n = min(count, len(self.free), self.limit if self.limit is not None else count)
        taken = [self.free.pop() for _ in range(n)]
        self.held |= set(taken)
        return ranges_from_units(taken)

    def free_units(self, ranges: Sequence[UnitRange]) -> None:
        for r in ranges:
            pages = set(range(r.start, r.end))
            assert pages <= self.held, "freed a page the kernel never gave out"
            self.held -= pages
            self.free.extend(pages)
            self.events.append(f"freed {r.start}+{r.count}")


@dataclass
class FakeRam:
    """A VM's RAM file, as the host's agent session uses it: ``pages`` pages; a punch
    with any other ``token`` is a bug; pages in ``reused`` no longer carry the token,
    so punching them frees nothing."""

    pages: int
    token: str
    holes: set[int] = field(default_factory=set)
    reused: set[int] = field(default_factory=set)

    def check(self, ranges: Sequence[UnitRange]) -> None:
        for r in ranges:
            if r.end > self.pages:
                raise GuestProtocolError(
                    f"pages {r.start}+{r.count} are not guest RAM", violation=Violation.BAD_PAGES
                )

    def punch(self, ranges: Sequence[UnitRange], token: bytes) -> int:
        assert token == bytes.fromhex(self.token)
        freed = [p for r in ranges for p in range(r.start, r.end) if p not in self.reused]
        self.holes.update(freed)
        return len(freed)

    def hole_pages(self, ranges: Sequence[UnitRange]) -> int:
        return sum(1 for r in ranges for p in range(r.start, r.end) if p in self.holes)

    def close(self) -> None:
        pass


@dataclass
class HoldsAtLimit:
    """A policy that decides as ``inner`` does, except that ``guest`` is held to
    ``allocation_bytes`` by the host's paging with its balloon deflated, as limit
    paging holds a guest, while ``holding``; it keeps every snapshot it sees."""

    inner: Policy
    guest: str
    allocation_bytes: int
    holding: bool = True
    seen: list[Snapshot] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.inner.name

    def decide(self, snapshot: Snapshot) -> Decision:
        self.seen.append(snapshot)
        decision = self.inner.decide(snapshot)
        if not self.holding:
            return decision
        held = GuestTarget(self.guest, self.allocation_bytes, 0, host_capped=True)
        targets = tuple(held if t.name == self.guest else t for t in decision.targets)
        return replace(decision, targets=targets)
