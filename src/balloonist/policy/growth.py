"""How fast each guest's memory in use grows, for the runway a growing guest keeps
and the lead a guest not short is given (the demand policy also measures its recent
working set's growth with it).

A guest that grows (a heap, a cache filling) touches new pages every period. Its
sampled working set follows a period or more behind, and its stall ends the moment
memory reaches it, so a policy led by the working set and the stall alone cuts it
back to what it has touched, hands the rest by shares to guests that do not use it,
and stalls it again to win the memory back. On a host with room to spare that swings
balloons by gigabytes a minute (suite-1-185: 4-11 GiB moved per guest in 71 s and
50 k major faults, where MOM's 5 % steps moved a few hundred MiB and caused none).
The demand policy lets a guest whose use grew keep what it would touch at that rate
over the next few seconds (``policy/demand.py``, ``runway_bytes``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


class UseGrowth:
    """Each guest's growth in a figure of bytes since the last update (its memory in
    use, or its recent working set), in bytes a second.

    A guest seen for the first time, or the first update, counts as not growing; a
    guest whose use fell (its balloon took pages, it freed them) as 0.
    """

    def __init__(self) -> None:
        self._in_use_bytes: dict[str, int] = {}
        self._time_s: float | None = None

    def update(self, time_s: float, names: Sequence[str], in_use_bytes: I64) -> F64:
        elapsed_s = 0.0 if self._time_s is None else time_s - self._time_s
        before = np.array([self._in_use_bytes.get(n, -1) for n in names], dtype=np.int64)
        self._in_use_bytes = dict(zip(names, in_use_bytes.tolist(), strict=True))
        self._time_s = time_s
        if elapsed_s <= 0.0:
            return np.zeros(len(names), dtype=np.float64)
        grown = np.where(before >= 0, np.maximum(in_use_bytes - before, 0), 0)
        out: F64 = grown / elapsed_s
        return out
