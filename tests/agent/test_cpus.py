"""The CPU balloon's sysfs side over a fake ``/sys/devices/system/cpu``: the list format,
which vCPUs are hotpluggable and online, the order vCPUs are taken and given back,
the last online vCPU, refused targets, and a kernel that refuses or ignores a write."""

from __future__ import annotations

from pathlib import Path

import pytest

from balloonist.agent.cpus import (
    MAX_CPU_ID,
    CpuBalloon,
    CpuHotplug,
    CpuTargetError,
    format_cpu_list,
    parse_cpu_list,
)
from balloonist.errors import ConfigError, FatalBackendError, TransientBackendError

from .fakes import FakeSysfs, FlakyHotplug


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0-3,5,7-8\n", {0, 1, 2, 3, 5, 7, 8}),
        ("0\n", {0}),
        ("\n", set()),  # the "offline" file of a guest with every CPU online
        ("", set()),
        (f"0-{MAX_CPU_ID}", set(range(MAX_CPU_ID + 1))),
    ],
)
def test_the_kernels_cpu_list_format_is_read(text: str, cpus: set[int]) -> None:
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize(
    "text",
    ["a", "3-1", f"{MAX_CPU_ID + 1}", "0-", "-1", "1,,2", "0 1", "\u0663", "1" * 30, "0-3-5"],
)
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(FatalBackendError):
        parse_cpu_list(text)


def test_lists_are_written_back_compactly_for_logs() -> None:
    assert format_cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert format_cpu_list(()) == "none"


def test_cpu0_without_an_online_file_is_online_and_not_hotpluggable(tmp_path: Path) -> None:
    FakeSysfs(tmp_path, 4)
    hotplug = CpuHotplug(tmp_path)
    assert hotplug.possible() == hotplug.present() == {0, 1, 2, 3}
    assert hotplug.hotpluggable() == {1, 2, 3}
    assert hotplug.online() == {0, 1, 2, 3}


def test_a_hotpluggable_vcpu_is_online_as_its_own_file_says(tmp_path: Path) -> None:
    tree = FakeSysfs(tmp_path, 4)
    tree.switch(2, False)  # the list file still says 0-3; the vCPU's own file is the truth
    assert CpuHotplug(tmp_path).online() == {0, 1, 3}


def test_reserving_takes_the_highest_numbered_and_releasing_the_newest(tmp_path: Path) -> None:
    tree = FakeSysfs(tmp_path, 6)
    balloon = CpuBalloon(CpuHotplug(tmp_path))
    assert balloon.reserve(2) == [5, 4]
    assert tree.offline() == {4, 5}
    tree.switch(3, False)  # an administrator's, not the balloon's: never chosen, never given back
    assert balloon.reserve(1) == [2]
    assert balloon.held == (5, 4, 2)
    assert balloon.release(2) == [2, 4]
    assert tree.offline() == {3, 5}
    assert balloon.view().online == (0, 1, 2, 4)
    assert balloon.view().reserved == (5,)


def test_the_last_online_vcpu_is_never_taken(tmp_path: Path) -> None:
    tree = FakeSysfs(tmp_path, 3, cpu0_hotpluggable=True)  # every vCPU could go
    balloon = CpuBalloon(CpuHotplug(tmp_path))
    assert balloon.reserve(10) == [2, 1]
    assert tree.offline() == {1, 2}
    assert balloon.reserve(1) == []
    assert CpuHotplug(tmp_path).online() == {0}


@pytest.mark.parametrize(
    ("cpus", "cpu0_hotpluggable", "target", "why"),
    [
        (2, False, 2, "would leave none online"),
        (2, True, 2, "would leave none online"),
        (4, False, 4, "would leave none online"),
        (4, False, 9, "would leave none online"),
        (1, False, 1, "would leave none online"),
        (4, True, -1, "cannot reserve -1"),
    ],
)
def test_a_target_that_takes_the_last_vcpu_is_refused_and_nothing_moves(
    tmp_path: Path, cpus: int, cpu0_hotpluggable: bool, target: int, why: str
) -> None:
    tree = FakeSysfs(tmp_path, cpus, cpu0_hotpluggable=cpu0_hotpluggable)
    balloon = CpuBalloon(CpuHotplug(tmp_path))
    with pytest.raises(CpuTargetError, match=why) as refused:
        balloon.check_target(target)
    assert isinstance(refused.value, ConfigError)  # the agent's bad-input error
    assert tree.offline() == set()


def test_a_target_needing_more_than_can_go_offline_is_refused(tmp_path: Path) -> None:
    tree = FakeSysfs(tmp_path, 4)
    tree.online_file(1).unlink()  # two vCPUs that cannot go offline: cpu0 and cpu1
    balloon = CpuBalloon(CpuHotplug(tmp_path))
    balloon.check_target(2)  # cpu2 and cpu3
    with pytest.raises(CpuTargetError, match="only 2 more can go offline"):
        balloon.check_target(3)  # would leave cpu0 online, but cpu1 cannot go
    balloon.reserve(2)
    balloon.check_target(2)  # where it is
    with pytest.raises(CpuTargetError, match="2 reserved and only 0 more"):
        balloon.check_target(3)
    balloon.check_target(0)  # giving back is always possible


def test_vcpus_brought_back_by_someone_else_are_forgotten(tmp_path: Path) -> None:
    tree = FakeSysfs(tmp_path, 4)
    balloon = CpuBalloon(CpuHotplug(tmp_path))
    balloon.reserve(2)
    assert balloon.forget_taken_back() == []
    tree.switch(3, True)
    assert balloon.forget_taken_back() == [3]
    assert balloon.held == (2,)


def test_a_refused_write_keeps_what_was_taken_before_it(tmp_path: Path) -> None:
    tree = FakeSysfs(tmp_path, 4)
    hotplug = FlakyHotplug(tmp_path)
    hotplug.refuse = {2}
    balloon = CpuBalloon(hotplug)
    with pytest.raises(TransientBackendError, match="busy"):
        balloon.reserve(3)
    assert balloon.held == (3,) and tree.offline() == {3}


def test_a_write_the_kernel_ignores_is_not_counted(tmp_path: Path) -> None:
    tree = FakeSysfs(tmp_path, 3)
    hotplug = FlakyHotplug(tmp_path)
    hotplug.ignore = {2}
    balloon = CpuBalloon(hotplug)
    with pytest.raises(TransientBackendError, match="still online"):
        balloon.reserve(1)
    assert not balloon.held and tree.offline() == set()
    hotplug.ignore = set()
    balloon.reserve(1)
    hotplug.ignore = {2}
    with pytest.raises(TransientBackendError, match="still offline"):
        balloon.release(1)
    assert balloon.held == (2,)


def test_sysfs_failures_are_backend_errors(tmp_path: Path) -> None:
    tree = FakeSysfs(tmp_path, 3)
    hotplug = CpuHotplug(tmp_path)
    tree.online_file(2).unlink()
    tree.online_file(2).mkdir()  # the write fails (EISDIR): not worth retrying
    with pytest.raises(FatalBackendError, match="cpu2"):
        hotplug.set_online(2, False)
    tree.online_file(1).write_text("maybe\n")
    with pytest.raises(FatalBackendError, match="expected 0 or 1"):
        hotplug.is_online(1)
    (tmp_path / "present").unlink()
    with pytest.raises(FatalBackendError, match="present"):
        hotplug.present()
    (tmp_path / "possible").write_text("0-3,banana\n")
    with pytest.raises(FatalBackendError, match="not a CPU number"):
        hotplug.possible()


def test_a_huge_sysfs_file_is_read_only_up_to_the_bound(tmp_path: Path) -> None:
    FakeSysfs(tmp_path, 2)
    (tmp_path / "possible").write_text("0," * 100_000)  # cut at 64 KiB, mid-list
    with pytest.raises(FatalBackendError):
        CpuHotplug(tmp_path).possible()


def test_the_state_file_follows_the_balloon_and_a_new_agent_adopts_from_it(
    tmp_path: Path,
) -> None:
    tree = FakeSysfs(tmp_path / "cpu", 6)
    state = tmp_path / "run" / "balloonist-agent.cpus"
    state.parent.mkdir()
    balloon = CpuBalloon(CpuHotplug(tree.root), state)
    balloon.reserve(3)
    assert state.read_text() == "5,4,3\n"
    # The agent dies (the OOM killer takes it first): its vCPUs stay offline. Someone
    # brings cpu4 back meanwhile; the next agent adopts the rest, in the same order.
    tree.switch(4, True)
    successor = CpuBalloon(CpuHotplug(tree.root), state)
    assert successor.adopt() == [5, 3]
    assert successor.held == (5, 3) and state.read_text() == "5,3\n"
    assert successor.release(1) == [3]  # the most recently taken of those
    successor.release(1)
    assert not state.exists() and tree.offline() == set()


@pytest.mark.parametrize("text", ["5,x\n", "5,5\n", f"{MAX_CPU_ID + 1}\n", "1-3\n"])
def test_a_bad_state_file_adopts_nothing(tmp_path: Path, text: str) -> None:
    tree = FakeSysfs(tmp_path / "cpu", 6)
    tree.switch(5, False)
    state = tmp_path / "state"
    state.write_text(text)
    balloon = CpuBalloon(CpuHotplug(tree.root), state)
    assert balloon.adopt() == [] and balloon.held == ()
    assert CpuBalloon(CpuHotplug(tree.root), tmp_path / "none").adopt() == []


def test_a_state_file_that_cannot_be_written_does_not_stop_the_balloon(tmp_path: Path) -> None:
    tree = FakeSysfs(tmp_path / "cpu", 3)
    balloon = CpuBalloon(CpuHotplug(tree.root), tmp_path / "no-such-dir" / "state")
    assert balloon.reserve(1) == [2] and tree.offline() == {2}
