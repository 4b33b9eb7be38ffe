"""Shared pytest set-up: tests that need root; the test guests' assets; the host's
KSM out of reach of tests that run no real VM.

A test marked ``root`` skips when run as another user, with the reason; under ``CI``
it fails instead, as the QEMU and browser tests do: CI must prove the root-only paths
(pagemap PFNs, dropping capabilities) work, not skip them.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from balloonist import ksm
from balloonist.daemon import host_reclaim
from balloonist.qemu import launcher
from balloonist.qemu.assets import GuestAssets, cached_assets, default_cache_dir

ROOT = Path(__file__).resolve().parents[1]

# Hypothesis times every example (200 ms by default) and how fast its data is drawn;
# on a loaded 2-core machine a descheduled process fails a correct property that way
# (a batch of tests/suite once failed beside four suite runs, and passed alone). How
# fast the code is lives in benchmarks/, not in tests: no example has a deadline.
settings.register_profile("balloonist", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("balloonist")


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("root")
    if marker is None or (sys.platform == "linux" and os.geteuid() == 0):
        return
    reason = str(marker.kwargs.get("reason", "needs Linux and root"))
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI must run it as root")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _no_host_ksm(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A daemon built in a test without real VMs finds no KSM (a directory that does
    not exist stands in for /sys/kernel/mm/ksm), so it never sets the host's: only
    ``vm`` tests drive the real one."""
    if request.node.get_closest_marker("vm") is None:
        monkeypatch.setattr(ksm, "KSM_ROOT", tmp_path_factory.getbasetemp() / "no-ksm")


@pytest.fixture(autouse=True)
def _no_host_cgroups(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon or launcher in a test without real VMs finds no memory cgroups, so it
    never caps one of the host's (the test runner's own, say): only ``vm`` tests use
    the real ones."""
    if request.node.get_closest_marker("vm") is None:
        monkeypatch.setattr(host_reclaim, "host_memory_hierarchy", lambda *_: None)
        monkeypatch.setattr(launcher, "host_memory_hierarchy", lambda *_: None)


def missing(what: str) -> None:
    """Skip a test whose set-up is missing; under ``CI``, fail it: CI must prove the
    real-VM paths work."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing, and CI must run the real-VM tests")
    pytest.skip(f"{what} is missing (run 'make test' to set it up)")


@pytest.fixture(scope="session")
def guest_assets() -> GuestAssets:
    """The test guest's kernel and initramfs (``balloonist guest-assets``)."""
    if shutil.which(launcher.QEMU_BINARY) is None:
        missing(launcher.QEMU_BINARY)
    for cache in (
        Path(os.environ["BALLOONIST_GUEST_ASSETS"])
        if os.environ.get("BALLOONIST_GUEST_ASSETS")
        else None,
        ROOT / ".cache" / "guest",
        default_cache_dir(),
    ):
        if cache is not None and (found := cached_assets(cache)) is not None:
            return found
    missing("the guest assets (balloonist guest-assets)")
    raise AssertionError("unreachable")
