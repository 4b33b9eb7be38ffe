"""The guest's resident order (stamps and a victim queue) gives the victim a recency or
arrival list would: checked against an ordered dict under random operations."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from balloonist.sim import engine as e

FRAMES = 40

# (operation, frame): use a frame (a fault brings a page into it, or LRU sees a hit),
# take one out (evicted or discarded), or ask for the victim.
_ops = st.lists(
    st.tuples(
        st.sampled_from(("use", "use", "use", "remove", "victim")), st.integers(0, FRAMES - 1)
    ),
    max_size=400,
)


@settings(max_examples=300, deadline=None)
@given(ops=_ops, lru=st.booleans(), queue=st.integers(1, FRAMES))
def test_the_victim_is_the_least_recent_frame(
    ops: list[tuple[str, int]], lru: bool, queue: int
) -> None:
    scalars = np.zeros(e.N_SCALARS, dtype=np.int64)
    scalars[e.S_STAMP] = 1
    stamp = np.zeros(FRAMES, dtype=np.int64)
    oldest = np.zeros(queue, dtype=np.int32)  # small queues refill often
    model: OrderedDict[int, None] = OrderedDict()  # oldest first
    for op, f in ops:
        if op == "use":
            # as run_guest: a fault stamps the frame it fills; under LRU a hit does too
            if f not in model or lru:
                model[f] = None
                model.move_to_end(f)
                stamp[f] = scalars[e.S_STAMP]
                scalars[e.S_STAMP] += 1
        elif op == "remove":
            model.pop(f, None)
            stamp[f] = 0
        else:
            expected = next(iter(model), -1)
            assert e._order_oldest(scalars, stamp, oldest) == expected


def test_a_new_guest_has_an_empty_order_and_clock_guests_carry_none() -> None:
    stamp, oldest = e.order_arrays(1000, e.LRU)
    assert stamp.shape == (1000,) and not stamp.any()
    assert oldest.shape == (250,)
    stamp, oldest = e.order_arrays(1000, e.CLOCK)
    assert stamp.size == 0 and oldest.size == 0
