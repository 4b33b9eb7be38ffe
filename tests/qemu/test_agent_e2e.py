"""The balloon agent on real guests under TCG, end to end: the shipped ``.pyz`` runs in
a guest whose root is the host's filesystem over 9p (started and controlled by
``guest_agent_supervisor.py``), and the host drives it through ``AgentPort``, the same
port the daemon uses, with the vCPUs paused around every punch. Marked ``vm``.

Thresholds and timeouts:
- BALLOON_MIB = 128 and MIN_EFFECT = 0.9: the guest must lose at least 90 % of the
  balloon from its own MemAvailable, and the RAM file at least 90 % of it in
  allocated blocks. For the second, the guest first touches TOUCH_MIB (and frees
  it), as a guest that has run a while has; a never-touched page frees nothing. Free
  page reporting is off for this guest: it would hand the freed memory back to the
  host within seconds on its own, leaving the balloon nothing to free (reporting is
  tested in test_host_mechanisms_vm.py).
  After deflating, touching TOUCH_MIB again must bring 90 % of it back into the file.
  Every pinned page is marked, so less means wrong offsets or moved pages; the slack
  is for what the guest allocates or frees meanwhile.
- REACH_TIMEOUT_S = 90: the agent's rate starts at 4 MiB/s and grows by 16 MiB/s with
  every 0.2 s step that succeeds, so 128 MiB takes about 2 s of steps; Python starting
  over 9p under TCG takes about 5 s. The rest is room for a loaded CI host without hiding a hang.
- SILENCE_TIMEOUT_S (agent_link): the host takes a silent agent for gone after 5 s.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from balloonist.daemon.agent_link import SILENCE_TIMEOUT_S, AgentPort
from balloonist.qemu import launcher
from balloonist.qemu.assets import GuestAssets
from balloonist.units import MIB
from tests.waiting import until

from .conftest import (
    BOOT_TIMEOUT_S,
    agent_port,
    boot_supervised,
    command,
    meminfo_kib,
    serial_lines,
    wait_for_line,
)

pytestmark = pytest.mark.vm

MEMORY_MIB = 384
BALLOON_MIB = 128
MIN_EFFECT = 0.9
REACH_TIMEOUT_S = 90.0
#: Touched (and freed) before inflating, so the balloon takes memory the host backs.
TOUCH_MIB = 250


def balloon_mib(port: AgentPort) -> float:
    return port.session.verified_freed_pages() * 4096 / MIB


def available_kib(record: launcher.VMRecord) -> int:
    line = wait_for_line(record, r"^BALLOONIST-MEM ", 30.0, after=len(serial_lines(record)))
    return meminfo_kib(line)["MemAvailable"]


def test_inflating_128_mib_takes_it_from_the_guest_and_frees_it_on_the_host(
    state: launcher.StateDir, guest_assets: GuestAssets, agent_pyz: Path, control: Path
) -> None:
    record = boot_supervised(
        state,
        guest_assets,
        "inflate",
        agent_pyz,
        control,
        memory_mib=MEMORY_MIB,
        free_page_reporting=False,
    )
    wait_for_line(record, r"^SUPERVISOR agent started", BOOT_TIMEOUT_S)
    assert record.ram_file is not None
    ram_file = Path(record.ram_file)

    # A guest that has run a while has touched its memory, and the host backs it;
    # memory a guest never touched costs the host nothing and frees nothing.
    command(control, f"hog-{TOUCH_MIB}")
    wait_for_line(record, r"^SUPERVISOR hog exited rc=0$", REACH_TIMEOUT_S)

    async def scenario() -> None:
        async with agent_port(record) as port:
            await until(lambda: port.session.alive(time.monotonic()), REACH_TIMEOUT_S, "hello")
            available_before = available_kib(record)
            allocated_before = ram_file.stat().st_blocks * 512
            await port.set_target((MEMORY_MIB - BALLOON_MIB) * MIB)
            await until(lambda: balloon_mib(port) >= BALLOON_MIB, REACH_TIMEOUT_S, "128 MiB freed")
            allocated_after = ram_file.stat().st_blocks * 512
            assert allocated_before - allocated_after >= MIN_EFFECT * BALLOON_MIB * MIB
            assert await port.actual_bytes() == (MEMORY_MIB - BALLOON_MIB) * MIB
            available_after = available_kib(record)
            assert available_before - available_after >= MIN_EFFECT * BALLOON_MIB * 1024
            # deflate: the guest has its memory back, the host stops counting it freed
            await port.set_target(MEMORY_MIB * MIB)
            await until(lambda: port.session.held_pages() == 0, REACH_TIMEOUT_S, "deflated")
            # The agent reports pages before it frees them (the protocol's rule 3), so
            # the next meminfo line may still miss the last step's pages: wait for one.
            mark = len(serial_lines(record))
            await until(
                lambda: any(
                    meminfo_kib(line)["MemAvailable"] - available_after
                    >= MIN_EFFECT * BALLOON_MIB * 1024
                    for line in serial_lines(record)[mark:]
                    if line.startswith("BALLOONIST-MEM ")
                ),
                REACH_TIMEOUT_S,
                "the guest to have its memory back",
            )
            assert await port.actual_bytes() == MEMORY_MIB * MIB
            # Deflating writes nothing: the host backs the pages again as the guest uses
            # them, and a guest that touches its memory again is back where it was.
            mark = len(serial_lines(record))
            command(control, f"hog-{TOUCH_MIB}")
            await until(
                lambda: any("hog exited rc=0" in line for line in serial_lines(record)[mark:]),
                REACH_TIMEOUT_S,
                "the second hog",
            )
            allocated_again = ram_file.stat().st_blocks * 512
            assert allocated_again - allocated_after >= MIN_EFFECT * BALLOON_MIB * MIB

    asyncio.run(scenario())


def test_under_real_memory_pressure_the_balloon_gives_way_and_nothing_is_oom_killed(
    state: launcher.StateDir, guest_assets: GuestAssets, agent_pyz: Path, control: Path
) -> None:
    record = boot_supervised(
        state, guest_assets, "pressure", agent_pyz, control, memory_mib=MEMORY_MIB
    )
    wait_for_line(record, r"^SUPERVISOR agent started", BOOT_TIMEOUT_S)

    async def scenario() -> None:
        async with agent_port(record) as port:
            await until(lambda: port.session.alive(time.monotonic()), REACH_TIMEOUT_S, "hello")
            await port.set_target((MEMORY_MIB - 200) * MIB)
            await until(lambda: balloon_mib(port) >= 200, REACH_TIMEOUT_S, "200 MiB balloon")
            rates: list[int] = []

            def note_rate() -> bool:
                stats = port.session.stats
                if stats is not None and (not rates or rates[-1] != stats.rate_pages):
                    rates.append(stats.rate_pages)
                return False

            # the next stats line carries the rate inflating grew to
            reached = port.session.stats
            await until(lambda: port.session.stats is not reached, REACH_TIMEOUT_S, "stats")
            note_rate()
            peak_rate = rates[-1]
            # Protocol version 2: the guest's stall total (PSI) and its swap (none here).
            before = await port.guest_stats()
            assert port.session.version == 2
            assert before.stall_s is not None and before.swap_used_bytes == 0
            # A process wanting 250 of the 184 MiB the balloon leaves: the guest must
            # take memory back from the balloon, not kill the process.
            mark = len(serial_lines(record))
            command(control, "hog-250")
            await until(
                lambda: (
                    note_rate() or any("hog exited" in line for line in serial_lines(record)[mark:])
                ),
                REACH_TIMEOUT_S,
                "the hog to finish",
            )
            assert wait_for_line(record, r"^SUPERVISOR hog exited rc=0$", 1.0, after=mark)
            assert not [
                line
                for line in serial_lines(record)[mark:]
                if re.search(r"Out of memory|oom-kill|Killed process", line)
            ]
            # the agent itself gave way; it was not what the OOM killer took either
            assert not [line for line in serial_lines(record)[mark:] if "agent exited" in line]
            assert port.cooperative
            assert min(rates) < peak_rate  # the rate was cut
            assert balloon_mib(port) < 200 - 50  # the balloon gave way
            # The squeeze made the guest's tasks wait on memory, and the host heard.
            after = await port.guest_stats()
            assert after.stall_s is not None and after.stall_s > before.stall_s

    asyncio.run(scenario())


def test_a_killed_agent_is_noticed_and_a_restarted_one_rebuilds_the_balloon(
    state: launcher.StateDir, guest_assets: GuestAssets, agent_pyz: Path, control: Path
) -> None:
    record = boot_supervised(
        state, guest_assets, "killed", agent_pyz, control, memory_mib=MEMORY_MIB
    )
    wait_for_line(record, r"^SUPERVISOR agent started", BOOT_TIMEOUT_S)

    async def scenario() -> None:
        async with agent_port(record) as port:
            await until(lambda: port.session.alive(time.monotonic()), REACH_TIMEOUT_S, "hello")
            await port.set_target((MEMORY_MIB - 64) * MIB)
            await until(lambda: balloon_mib(port) >= 64, REACH_TIMEOUT_S, "64 MiB balloon")
            first_token = port.session.token
            command(control, "kill")
            await until(lambda: not port.cooperative, SILENCE_TIMEOUT_S + 10, "the host to notice")
            # the guest runs on: init keeps printing its memory
            mark = len(serial_lines(record))
            wait_for_line(record, r"^BALLOONIST-MEM ", 30.0, after=mark)
            command(control, "start")
            await until(lambda: port.cooperative, REACH_TIMEOUT_S, "the agent to come back")
            assert port.session.token != first_token  # a new session
            await until(lambda: balloon_mib(port) >= 64, REACH_TIMEOUT_S, "the balloon rebuilt")

    asyncio.run(scenario())
