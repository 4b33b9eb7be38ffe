"""The daemon over an agent VM and a virtio-balloon VM side by side, one policy (``vm``).

Two idle 384 MiB guests share a 560 MiB budget: the policy must take memory from both,
from "agent" through our agent (the host punching the memory out of its RAM file) and
from "plain" through virtio-balloon, and every target stays within [min, max].

Thresholds:
- TAKE_BYTES: 64 MiB from each. With 560 MiB for 768 MiB of guests, about 100 MiB each
  must go, more with the idle tax.
- DEADLINE_S: both guests boot in about 10 s under TCG and the host paces the first
  steps at 16 MiB/s; the agent needs about 5 s to start Python over 9p. 120 s.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from balloonist.daemon.agent_link import AgentPort
from balloonist.daemon.service import Daemon, DaemonConfig
from balloonist.qemu import launcher
from balloonist.qemu.assets import GuestAssets, host_python
from balloonist.qemu.reclaim import GuestRam
from balloonist.units import MIB

from .conftest import boot, wait_for_line

pytestmark = pytest.mark.vm

MEMORY_MIB = 384
MIN_BYTES = 128 * MIB
TAKE_BYTES = 64 * MIB
DEADLINE_S = 120.0


def actual_bytes(daemon: Daemon, name: str) -> int | None:
    """The guest's size, if the daemon sampled it this period."""
    view = daemon.hv.view(name)
    return view.actual_bytes if view is not None else None


def test_agent_and_virtio_balloon_guests_are_managed_side_by_side(
    state: launcher.StateDir, guest_assets: GuestAssets, agent_pyz: Path
) -> None:
    agent = boot(
        state,
        guest_assets,
        "agent",
        memory_mib=MEMORY_MIB,
        min_bytes=MIN_BYTES,
        agent=True,
        run=(host_python(), str(agent_pyz)),
    )
    boot(state, guest_assets, "plain", memory_mib=MEMORY_MIB, min_bytes=MIN_BYTES)
    wait_for_line(agent, r"balloonist-agent: ", 60.0)  # it logs as it starts
    assert agent.ram_file is not None
    ram = GuestRam(Path(agent.ram_file), agent.memory_bytes)
    sent: list[tuple[str, int]] = []
    config = DaemonConfig.model_validate({"daemon": {"budget": "560MiB"}})
    daemon = Daemon(config, state, on_target=lambda name, b: sent.append((name, b)))
    allocated_peak = ram.allocated_bytes()
    try:
        end = time.monotonic() + DEADLINE_S
        took = False
        while time.monotonic() < end and not took:
            started = time.monotonic()
            daemon.step()
            allocated_peak = max(allocated_peak, ram.allocated_bytes())
            took = all(
                (actual_bytes(daemon, name) or MEMORY_MIB * MIB) <= MEMORY_MIB * MIB - TAKE_BYTES
                for name in ("agent", "plain")
            )
            daemon.idle(max(0.0, 1.0 - (time.monotonic() - started)))
        assert took, {name: actual_bytes(daemon, name) for name in ("agent", "plain")}
        seen, plain = daemon.hv.view("agent"), daemon.hv.view("plain")
        assert seen is not None and plain is not None
        port = seen.port
        assert isinstance(port, AgentPort) and port.cooperative
        assert not isinstance(plain.port, AgentPort)
        # what the daemon counts as taken from the agent VM is what the host has back
        assert port.session.verified_freed_pages() * 4096 >= TAKE_BYTES
        assert sent and all(MIN_BYTES <= b <= MEMORY_MIB * MIB for _, b in sent)
        assert {name for name, _ in sent} == {"agent", "plain"}
    finally:
        daemon.close()
        ram.close()
