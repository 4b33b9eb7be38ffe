"""A VM's memory cgroup: finding the hierarchy and a process's cgroup, and the files
of both versions, on temporary directories (the real one is used by the VM tests)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from balloonist.cgroup import (
    CgroupVersion,
    MemoryCgroup,
    MemoryHierarchy,
    cgroup_of_process,
    cgroup_path_of,
    make_parent_cgroup,
    make_vm_cgroup,
    memory_hierarchy,
    remove_vm_cgroup,
)
from balloonist.errors import BackendError, FatalBackendError
from balloonist.units import MIB

V1_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_MOUNTS = "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
CONTAINER_MOUNTS = "35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n"


def test_v1_memory_is_found_before_v2() -> None:
    found = memory_hierarchy(V1_MOUNTS, v2_controllers="cpu memory")
    assert found == MemoryHierarchy(Path("/sys/fs/cgroup/memory"), CgroupVersion.V1, "/")


def test_v2_holds_memory_only_if_its_controllers_say_so() -> None:
    assert memory_hierarchy(V2_MOUNTS, v2_controllers="cpuset cpu io memory pids") == (
        MemoryHierarchy(Path("/sys/fs/cgroup"), CgroupVersion.V2, "/")
    )
    assert memory_hierarchy(V2_MOUNTS, v2_controllers="cpu io") is None
    assert memory_hierarchy(V2_MOUNTS) is None
    assert memory_hierarchy("garbage\n\n - \n") is None


def test_a_process_s_memory_cgroup_by_version() -> None:
    text = "9:name=systemd:/\n4:memory:/machine/qemu-1-web\n1:cpu,cpuacct:/x\n0::/v2/web\n"
    assert cgroup_path_of(text, CgroupVersion.V1) == "/machine/qemu-1-web"
    assert cgroup_path_of(text, CgroupVersion.V2) == "/v2/web"
    assert cgroup_path_of("1:cpu:/x\n", CgroupVersion.V1) is None


def fake_proc(tmp_path: Path, pid: int, text: str) -> Path:
    """A ``/proc`` under ``tmp_path`` where process ``pid`` has ``text`` as its cgroup."""
    proc = tmp_path / "proc"
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cgroup").write_text(text)
    return proc


def test_a_process_in_the_root_or_outside_the_mount_has_none_to_cap(tmp_path: Path) -> None:
    v1 = memory_hierarchy(V1_MOUNTS)
    assert v1 is not None
    proc = fake_proc(tmp_path, 7, "4:memory:/balloonist/web\n")
    assert cgroup_of_process(7, v1, proc) == MemoryCgroup(
        Path("/sys/fs/cgroup/memory/balloonist/web"), CgroupVersion.V1
    )
    assert cgroup_of_process(8, v1, proc) is None  # no such process
    root = fake_proc(tmp_path / "r", 7, "4:memory:/\n")
    assert cgroup_of_process(7, v1, root) is None
    # In a container that sees part of the hierarchy, paths are relative to its root.
    inside = memory_hierarchy(CONTAINER_MOUNTS)
    assert inside is not None and inside.root == "/docker/abc"
    proc = fake_proc(tmp_path / "c", 7, "4:memory:/docker/abc/vm\n")
    assert cgroup_of_process(7, inside, proc) == MemoryCgroup(
        Path("/sys/fs/cgroup/memory/vm"), CgroupVersion.V1
    )
    proc = fake_proc(tmp_path / "o", 7, "4:memory:/docker/other\n")
    assert cgroup_of_process(7, inside, proc) is None


def _v1(tmp_path: Path) -> MemoryCgroup:
    for name, value in (
        ("memory.limit_in_bytes", "9223372036854771712"),
        ("memory.soft_limit_in_bytes", "9223372036854771712"),
        ("memory.usage_in_bytes", str(300 * MIB)),
        ("memory.stat", f"cache 0\nrss {300 * MIB}\nswap {40 * MIB}\ntotal_swap {40 * MIB}\n"),
        ("cgroup.procs", ""),
    ):
        (tmp_path / name).write_text(value)
    return MemoryCgroup(tmp_path, CgroupVersion.V1)


def _v2(tmp_path: Path) -> MemoryCgroup:
    for name, value in (
        ("memory.high", "max"),
        ("memory.current", str(300 * MIB)),
        ("memory.swap.current", str(40 * MIB)),
    ):
        (tmp_path / name).write_text(value)
    return MemoryCgroup(tmp_path, CgroupVersion.V2)


@pytest.mark.parametrize("make", [_v1, _v2], ids=["v1", "v2"])
def test_cap_usage_and_swap_in_either_version(
    tmp_path: Path, make: Callable[[Path], MemoryCgroup]
) -> None:
    cgroup = make(tmp_path)
    assert cgroup.limit_bytes() is None
    assert (cgroup.usage_bytes(), cgroup.swapped_bytes()) == (300 * MIB, 40 * MIB)
    cgroup.set_limit(200 * MIB)
    assert cgroup.limit_bytes() == 200 * MIB
    cgroup.set_limit(None)
    assert cgroup.limit_bytes() is None
    with pytest.raises(ValueError, match="positive"):
        cgroup.set_limit(0)


def test_v1_writes_both_caps(tmp_path: Path) -> None:
    cgroup = _v1(tmp_path)
    cgroup.set_limit(200 * MIB)
    assert (tmp_path / "memory.soft_limit_in_bytes").read_text() == str(200 * MIB)
    cgroup.set_limit(None)
    assert (tmp_path / "memory.limit_in_bytes").read_text() == "-1"
    assert (tmp_path / "memory.high").exists() is False


def test_v1_without_swap_accounting_does_not_know_its_swap(tmp_path: Path) -> None:
    cgroup = _v1(tmp_path)
    (tmp_path / "memory.stat").write_text("cache 0\nrss 1\n")
    assert cgroup.swapped_bytes() is None


@pytest.mark.parametrize("value", ["lots", "-5", "9" * 40])
def test_what_the_kernel_would_never_write_is_refused(tmp_path: Path, value: str) -> None:
    cgroup = _v2(tmp_path)
    (tmp_path / "memory.current").write_text(value)
    with pytest.raises(FatalBackendError):
        cgroup.usage_bytes()


def test_a_cgroup_that_is_gone_is_fatal_and_a_refused_write_is_not(tmp_path: Path) -> None:
    gone = MemoryCgroup(tmp_path / "gone", CgroupVersion.V2)
    with pytest.raises(FatalBackendError):
        gone.usage_bytes()
    with pytest.raises(FatalBackendError):
        gone.set_limit(MIB)
    refused = _v2(tmp_path)
    (tmp_path / "memory.high").unlink()
    (tmp_path / "memory.high").mkdir()  # writing a directory fails, as a refused write
    with pytest.raises(BackendError) as info:
        refused.set_limit(MIB)
    assert not isinstance(info.value, FatalBackendError)


def test_a_vm_cgroup_is_made_under_balloonist_and_removed_when_empty(tmp_path: Path) -> None:
    v1 = MemoryHierarchy(tmp_path, CgroupVersion.V1)
    cgroup = make_vm_cgroup(v1, "web")
    assert cgroup.path == tmp_path / "balloonist" / "web" and cgroup.path.is_dir()
    remove_vm_cgroup(cgroup.path)
    assert not cgroup.path.exists()
    remove_vm_cgroup(cgroup.path)  # already gone: nothing to do


def test_the_parent_cgroup_holds_every_vm_cgroup(tmp_path: Path) -> None:
    v1 = MemoryHierarchy(tmp_path, CgroupVersion.V1)
    parent = make_parent_cgroup(v1)
    assert parent.path == tmp_path / "balloonist" and parent.path.is_dir()
    assert make_vm_cgroup(v1, "web").path.parent == parent.path


def test_v2_hands_the_memory_controller_down(tmp_path: Path) -> None:
    (tmp_path / "cgroup.subtree_control").write_text("cpu")
    (tmp_path / "balloonist").mkdir()
    (tmp_path / "balloonist" / "cgroup.subtree_control").write_text("memory")
    make_vm_cgroup(MemoryHierarchy(tmp_path, CgroupVersion.V2), "web")
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory"
    assert (tmp_path / "balloonist" / "cgroup.subtree_control").read_text() == "memory"


def test_a_busy_cgroup_is_tried_again_until_it_empties(tmp_path: Path) -> None:
    path = tmp_path / "vm"
    path.mkdir()
    (path / "left").write_text("")  # as a cgroup whose last process is not yet reaped
    assert remove_vm_cgroup(path, timeout_s=0.1) is False and path.exists()
    (path / "left").unlink()
    assert remove_vm_cgroup(path, timeout_s=0.1) is True and not path.exists()
