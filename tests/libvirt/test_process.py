"""What the host says about a domain's QEMU process: pid, shared RAM file, vCPU threads."""

from __future__ import annotations

import json
from pathlib import Path

from balloonist.daemon.agent_link import AgentPort
from balloonist.daemon.config import DaemonConfig
from balloonist.libvirt.port import DomainBalloon
from balloonist.libvirt.process import (
    domain_pid,
    filesystem_type,
    shared_ram_file,
    vcpu_threads,
)
from balloonist.libvirt.source import LibvirtVms

from .fakes import FakeDomain, fake_libvirt

RAM = {
    "qom-type": "memory-backend-file",
    "id": "pc.ram",
    "mem-path": "/var/lib/libvirt/qemu/ram/1-web/pc.ram",
    "share": True,
    "size": 536870912,
}


def test_the_shared_ram_file_is_read_from_qemus_json_objects() -> None:
    argv = ["qemu-system-x86_64", "-name", "web", "-object", json.dumps(RAM), "-m", "512"]
    assert shared_ram_file(argv) == RAM["mem-path"]


def test_private_several_or_no_ram_files_are_none() -> None:
    private = json.dumps({**RAM, "share": False})
    numa = [json.dumps({**RAM, "id": f"ram-node{i}"}) for i in range(2)]
    assert shared_ram_file(["-object", private]) is None
    assert shared_ram_file(["-object", *numa]) is None
    assert shared_ram_file(["-object", "{not json", "-m", "512"]) is None


def fake_process(proc: Path, pid: int, threads: dict[int, str], argv: list[str]) -> None:
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    for tid, name in threads.items():
        (proc / str(pid) / "task" / str(tid)).mkdir(parents=True)
        (proc / str(pid) / "task" / str(tid) / "comm").write_text(name + "\n")


def test_vcpu_threads_are_found_by_the_names_qemu_gives_them(tmp_path: Path) -> None:
    fake_process(tmp_path, 10, {10: "qemu-system-x86", 11: "CPU 1/KVM", 12: "CPU 0/KVM"}, [])
    assert vcpu_threads(10, 2, tmp_path) == {0: 12, 1: 11}
    fake_process(tmp_path, 20, {20: "qemu-system-x86", 21: "ALL CPUs/TCG"}, [])
    assert vcpu_threads(20, 3, tmp_path) == {0: 21, 1: 21, 2: 21}
    assert vcpu_threads(30, 1, tmp_path) == {}  # gone


def test_domain_pid(tmp_path: Path) -> None:
    (tmp_path / "web.pid").write_text("1234\n")
    (tmp_path / "bad.pid").write_text("x")
    assert domain_pid("web", tmp_path) == 1234
    assert domain_pid("bad", tmp_path) is None
    assert domain_pid("none", tmp_path) is None


def agent_domain(name: str) -> FakeDomain:
    domain = FakeDomain(name, 512 * 1024)
    domain.metadata_xml = {1: "<settings managed='yes'/>"}
    domain.extra_devices = (
        "<channel type='unix'><source mode='bind' path='/run/x.sock'/>"
        "<target type='virtio' name='org.balloonist.agent.0'/></channel>"
    )
    return domain


def test_an_agent_domain_on_this_host_is_managed_through_its_agent(tmp_path: Path) -> None:
    run, proc = tmp_path / "run", tmp_path / "proc"
    run.mkdir()
    libvirt, _ = fake_libvirt(agent_domain("web"), agent_domain("far"))
    (run / "web.pid").write_text("77")
    ram = tmp_path / "pc.ram"
    with ram.open("wb") as f:
        f.truncate(512 * 1024 * 1024)  # sparse, as QEMU's is before the guest touches it
    here = json.dumps({**RAM, "mem-path": str(ram)})
    fake_process(proc, 77, {78: "CPU 0/TCG"}, ["qemu", "-object", here])
    (proc / "mounts").write_text(f"/dev/vda / ext4 rw 0 0\ntmpfs {tmp_path} tmpfs rw 0 0\n")
    vms = LibvirtVms(libvirt, DaemonConfig(), run_dir=run, proc=proc)
    records = {r.name: r for r in vms.records()}
    web, far = records["web"], records["far"]
    assert (web.agent_socket, web.ram_file, web.pid, web.cpus) == ("/run/x.sock", str(ram), 77, 1)
    assert far.agent_socket is None and far.ram_file is None  # no QEMU here: its balloon
    port = vms.port(web, lambda: 0.0)
    assert isinstance(port, AgentPort)
    port.release()
    assert isinstance(vms.port(far, lambda: 0.0), DomainBalloon)


def test_the_filesystem_a_path_is_on() -> None:
    mounts = (
        "/dev/vda / ext4 rw 0 0\n"
        "tmpfs /dev/shm tmpfs rw 0 0\n"
        "tmpfs /dev/shm/x ramfs rw 0 0\n"
        "shm /dev/shm tmpfs rw 0 0\n"
    )
    assert filesystem_type("/var/lib/libvirt/qemu/ram/1-web/pc.ram", mounts) == "ext4"
    assert filesystem_type("/dev/shm/libvirt/qemu/1-web/pc.ram", mounts) == "tmpfs"
    assert filesystem_type("/dev/shm/x/y", mounts) == "ramfs"
    assert filesystem_type("/dev/shmem/y", mounts) == "ext4"  # a prefix is not a parent
    assert filesystem_type("/x", "") is None


def test_an_agent_domain_whose_ram_is_on_disk_is_managed_by_its_balloon(tmp_path: Path) -> None:
    run, proc = tmp_path / "run", tmp_path / "proc"
    run.mkdir()
    libvirt, _ = fake_libvirt(agent_domain("web"))
    (run / "web.pid").write_text("77")
    fake_process(proc, 77, {78: "CPU 0/TCG"}, ["qemu", "-object", json.dumps(RAM)])
    (proc / "mounts").write_text("/dev/vda / ext4 rw 0 0\n")
    (web,) = LibvirtVms(libvirt, DaemonConfig(), run_dir=run, proc=proc).records()
    assert web.agent_socket is None and web.ram_file is None
