"""Waiting in tests: on a condition, with a deadline, never a bare sleep.

The deadline only bounds a hang; a condition met early returns at once. Both raise
AssertionError naming ``what`` when it passes (a callable is asked then: say, for a
log to show), and return the seconds waited.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

#: How often a condition is checked: often enough not to slow a test down.
POLL_S = 0.02


Description = str | Callable[[], str]


def _missed(timeout_s: float, what: Description) -> AssertionError:
    return AssertionError(
        f"not within {timeout_s:g} s: {what if isinstance(what, str) else what()}"
    )


def wait_until(
    condition: Callable[[], bool], timeout_s: float, what: Description = "the condition"
) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise _missed(timeout_s, what)
        time.sleep(POLL_S)
    return time.monotonic() - start


async def until(
    condition: Callable[[], bool], timeout_s: float, what: Description = "the condition"
) -> float:
    """As :func:`wait_until`, with the event loop running meanwhile (the code under
    test reads its sockets there)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise _missed(timeout_s, what)
        await asyncio.sleep(POLL_S)
    return time.monotonic() - start
