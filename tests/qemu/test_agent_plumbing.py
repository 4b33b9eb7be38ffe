"""The agent VM and host-root guest plumbing that needs no QEMU: command lines, records,
the RAM file, the guest command line, module dependencies."""

from __future__ import annotations

import json
import stat
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from balloonist.agent.protocol import PORT_NAME
from balloonist.cli import main
from balloonist.errors import ConfigError
from balloonist.qemu import launcher
from balloonist.qemu.assets import (
    GuestAssets,
    host_python,
    host_root_cmdline,
    module_depends,
    module_name,
)
from balloonist.qemu.launcher import BALLOON_ID
from balloonist.units import GIB, MIB


def _request(
    tmp_path: Path, *, agent: bool = False, share_root: bool = False
) -> launcher.StartRequest:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    return launcher.StartRequest(
        name="g", memory_bytes=512 * MIB, kernel=kernel, agent=agent, share_root=share_root
    )


def _command(request: launcher.StartRequest, ram_file: Path | None = None) -> list[str]:
    return launcher.build_command(
        request, binary="qemu", accel="tcg", directory=Path("/s/vms/g"), ram_file=ram_file
    )


def test_an_agent_vm_gets_file_backed_ram_and_the_agent_port(tmp_path: Path) -> None:
    cmd = _command(_request(tmp_path, agent=True), ram_file=Path("/dev/shm/x.ram"))
    joined = " ".join(cmd)
    assert "memory-backend-file,id=ram0,size=512M,mem-path=/dev/shm/x.ram,share=on" in cmd
    assert cmd[cmd.index("-m") + 1] == "512M"  # QEMU insists the two sizes agree
    assert cmd[cmd.index("-machine") + 1] == "pc,memory-backend=ram0"  # reclaim's layout
    assert "socket,id=agent0,path=/s/vms/g/agent.sock,server=on,wait=off" in cmd
    assert f"virtserialport,bus=vserial0.0,chardev=agent0,name={PORT_NAME}" in cmd
    assert "virtio-balloon-pci" in joined  # either mechanism may manage it
    assert "9p" not in joined


def test_a_plain_vm_gets_none_of_it_and_a_host_root_vm_gets_the_share(tmp_path: Path) -> None:
    plain = " ".join(_command(_request(tmp_path)))
    for word in ("memory-backend", "-machine", "virtserialport", "9p"):
        assert word not in plain
    shared = _command(_request(tmp_path, share_root=True))
    assert "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap" in shared
    assert "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot" in shared
    with pytest.raises(ValueError, match="RAM file"):
        _command(_request(tmp_path, agent=True))


def test_old_vm_records_load_and_new_ones_round_trip(tmp_path: Path) -> None:
    state = launcher.StateDir(tmp_path)
    record = launcher.VMRecord(
        name="old", memory_bytes=GIB, min_bytes=0, max_bytes=GIB, shares=1000,
        qmp_socket="/q", serial_log=None, pid=None, accel=None, started_by_us=False,
    )  # fmt: skip
    old = asdict(record)
    del old["ram_file"], old["agent_socket"]
    (tmp_path / "vms" / "old").mkdir(parents=True)
    (tmp_path / "vms" / "old" / "vm.json").write_text(json.dumps(old))
    assert state.load("old") == record and not record.agent
    agent = replace(record, name="new", ram_file="/dev/shm/r.ram", agent_socket="/a.sock")
    state.save(agent)
    assert state.load("new") == agent and agent.agent


def test_a_vm_record_with_the_former_cpu_names_loads(tmp_path: Path) -> None:
    state = launcher.StateDir(tmp_path)
    record = launcher.VMRecord(
        name="cpu", memory_bytes=GIB, min_bytes=0, max_bytes=GIB, shares=1000,
        qmp_socket="/q", serial_log=None, pid=None, accel=None, started_by_us=False,
        cpus=4, min_cpus=2, max_cpus=3,
    )  # fmt: skip
    old = asdict(record)
    old["cpu_min"], old["cpu_max"] = old.pop("min_cpus"), old.pop("max_cpus")
    (tmp_path / "vms" / "cpu").mkdir(parents=True)
    (tmp_path / "vms" / "cpu" / "vm.json").write_text(json.dumps(old))
    assert state.load("cpu") == record


def test_vm_list_shows_which_vms_have_an_agent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = launcher.StateDir(tmp_path)
    base = launcher.VMRecord(
        name="plain", memory_bytes=GIB, min_bytes=0, max_bytes=GIB, shares=1000,
        qmp_socket="/nonexistent", serial_log=None, pid=None, accel=None, started_by_us=False,
    )  # fmt: skip
    state.save(base)
    state.save(replace(base, name="withagent", agent_socket="/a.sock", ram_file="/r"))
    assert main(["vm", "--state-dir", str(tmp_path), "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "AGENT" in lines[0].split()
    assert lines[1].split()[:2] == ["plain", "gone"] and " no " in lines[1]
    assert lines[2].startswith("withagent") and " yes " in lines[2]


def test_ram_files_are_unique_per_state_dir_and_name(tmp_path: Path) -> None:
    a = launcher.ram_file_path(tmp_path / "a", "g")
    assert a.parent == launcher.RAM_DIR and a.name.endswith("-g.ram")
    assert a == launcher.ram_file_path(tmp_path / "a", "g")
    assert a != launcher.ram_file_path(tmp_path / "b", "g")
    assert a != launcher.ram_file_path(tmp_path / "a", "h")


def test_a_ram_file_is_ours_alone_and_needs_room(tmp_path: Path) -> None:
    path = tmp_path / "g.ram"
    path.write_bytes(b"stale")  # from a VM that died without 'vm stop'
    launcher._create_ram_file(path, MIB)
    assert path.stat().st_size == 0 and stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match=r"which has .* free, less than the VM's"):
        launcher._create_ram_file(tmp_path / "huge.ram", 1 << 60)
    with pytest.raises(ConfigError, match="keep their RAM in"):
        launcher._create_ram_file(tmp_path / "nowhere" / "g.ram", MIB)


def test_the_guest_command_line_carries_the_program_word_by_word(tmp_path: Path) -> None:
    python = host_python()
    script = tmp_path / "s.py"
    script.write_text("")
    assert host_root_cmdline() == "balloonist.root=9p"
    assert host_root_cmdline([python, str(script), "--mib=96", "a,b"]) == (
        f"balloonist.root=9p balloonist.run={python} balloonist.arg={script} "
        "balloonist.arg=--mib=96 balloonist.arg=a,b"
    )
    bad = [
        ["python3"],  # not absolute
        [str(tmp_path / "missing")],
        ["/etc/passwd"],  # not executable
        [python, "two words"],
        [python, 'quo"te'],
        [python, ""],
    ]
    for run in bad:
        with pytest.raises(ConfigError):
            host_root_cmdline(run)
    with pytest.raises(ConfigError, match="the guest has its own /tmp"):
        host_root_cmdline(["/tmp/prog"])


def test_running_a_program_implies_the_host_root(tmp_path: Path) -> None:
    (tmp_path / "k").write_bytes(b"k")
    (tmp_path / "i").write_bytes(b"i")
    assets = GuestAssets(kernel=tmp_path / "k", initrd=tmp_path / "i", kernel_version="6.1")
    plain = assets.start_request("g", 512 * MIB)
    assert not plain.share_root and "balloonist.root" not in plain.append
    request = assets.start_request("g", 512 * MIB, run=(host_python(), "-V"), agent=True)
    assert request.share_root and request.agent
    assert request.append.endswith(f"balloonist.run={host_python()} balloonist.arg=-V")
    request.validate()
    with pytest.raises(ConfigError, match="command line is longer"):
        replace(request, append="x" * 2100).validate()


def test_module_dependencies_are_read_from_modinfo() -> None:
    modinfo = b"\x7fELF...\0license=GPL\0depends=9pnet,fscache,netfs\0intree=Y\0"
    assert module_depends(modinfo) == ["9pnet", "fscache", "netfs"]
    assert module_depends(b"\0depends=\0") == []
    assert module_depends(b"no modinfo here") == []
    assert module_name("kernel/net/9p/9pnet_virtio.ko") == "9pnet_virtio"
    assert module_name("kernel/drivers/x/snd-hda.ko") == "snd_hda"


def test_free_page_reporting_is_on_unless_turned_off(tmp_path: Path) -> None:
    on = _command(_request(tmp_path))
    assert f"virtio-balloon-pci,id={BALLOON_ID},deflate-on-oom=on,free-page-reporting=on" in on
    request = replace(_request(tmp_path), free_page_reporting=False)
    assert any(arg.endswith("free-page-reporting=off") for arg in _command(request))
