"""Shared pytest set-up: tests that need root.

A test marked ``root`` skips when run as another user, with the reason; under ``CI``
it fails instead, as the QEMU and browser tests do: CI must prove the root-only paths
(pagemap PFNs, dropping capabilities) work, not skip them.
"""

from __future__ import annotations

import os
import sys

import pytest


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("root")
    if marker is None or (sys.platform == "linux" and os.geteuid() == 0):
        return
    reason = str(marker.kwargs.get("reason", "needs Linux and root"))
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI must run it as root")
    pytest.skip(reason)
