"""A real libvirtd for the ``libvirt`` tests, and test-guest domains under it.

When a libvirtd already answers on ``qemu:///system`` it is used and left running.
Otherwise (as root) one is started by hand, as on a host without systemd: the
``libvirt-qemu`` system user the QEMU driver wants must exist, a ``qemu.conf`` runs
QEMU as root with its output to files (there is no virtlogd) and guest RAM files on a
tmpfs (the agent needs it), and ``/var/log/libvirt`` must exist. What the fixture
created, it removes; the libvirtd it started, it stops.
Missing libvirt is a skip, and under ``CI`` a failure (make test installs it).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from balloonist.libvirt.domain_xml import DomainSettings
from balloonist.qemu.assets import GuestAssets, host_root_cmdline
from balloonist.qemu.launcher import HOST_ROOT_TAG

from ..conftest import missing
from ..qemu.conftest import BOOT_TIMEOUT_S, agent_pyz  # noqa: F401 (a fixture, shared)
from ..waiting import wait_until

URI = "qemu:///system"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
#: Agent domains' RAM files must be on a tmpfs (docs/libvirt.md).
RAM_DIR = Path("/dev/shm/balloonist-test-libvirt")
#: libvirtd answers about 1 s after it starts here; a loaded CI host gets 60.
START_TIMEOUT_S = 60.0


def _answers() -> bool:
    try:
        done = subprocess.run(
            ["virsh", "-c", URI, "version"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@dataclass
class Libvirtd:
    """The libvirtd the tests run against; ``restart`` only if the fixture started it."""

    pid_file: Path | None = None
    created: list[Path] = field(default_factory=list)

    @property
    def ours(self) -> bool:
        return self.pid_file is not None

    def start(self) -> None:
        assert self.pid_file is not None
        subprocess.run(["libvirtd", "--daemon", "--pid-file", str(self.pid_file)], check=True)
        wait_until(_answers, START_TIMEOUT_S, "libvirtd to answer on " + URI)

    def stop(self) -> None:
        assert self.pid_file is not None
        pid = int(self.pid_file.read_text().strip())
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), 30, "libvirtd to exit")

    def restart(self) -> None:
        if not self.ours:
            pytest.skip("libvirtd was running already: not restarting someone else's")
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[Libvirtd]:
    try:
        import libvirt  # noqa: F401 (is libvirt-python there?)
    except ImportError:
        missing("libvirt-python (pip install 'balloonist[libvirt]')")
    if _answers():
        yield Libvirtd()
        return
    if shutil.which("libvirtd") is None or shutil.which("virsh") is None:
        missing("libvirtd (apt-get install libvirt-daemon libvirt-daemon-driver-qemu)")
    if os.geteuid() != 0:
        missing("root, to start a libvirtd")
    daemon = Libvirtd(pid_file=Path(f"/run/balloonist-test-libvirtd-{os.getpid()}.pid"))
    subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home", "libvirt-qemu"],
        capture_output=True,
        check=False,  # exists already: fine
    )
    if not QEMU_CONF.exists():
        QEMU_CONF.parent.mkdir(parents=True, exist_ok=True)
        QEMU_CONF.write_text(
            'user = "root"\ngroup = "root"\nstdio_handler = "file"\n'
            f'memory_backing_dir = "{RAM_DIR}"\n'
        )
        daemon.created.append(QEMU_CONF)
    for directory in (Path("/var/log/libvirt"), Path("/var/lib/libvirt/qemu"), RAM_DIR):
        if not directory.exists():
            directory.mkdir(parents=True)
            daemon.created.append(directory)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        for path in reversed(daemon.created):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@dataclass
class TestDomain:
    name: str
    serial_log: Path

    def lines(self) -> list[str]:
        try:
            return self.serial_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []


def virsh(*args: str) -> str:
    done = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"virsh {' '.join(args)}: {done.stderr.strip()}"
    return done.stdout


def domain_xml(
    assets: GuestAssets,
    name: str,
    serial_log: Path,
    *,
    memory_mib: int,
    work: str,
    balloon: str = "virtio",
    settings: DomainSettings | None = None,
    run: tuple[str, ...] = (),
    kernel_args: str = "",
    vcpus: int = 1,
    virtio_mem_mib: int | None = None,
) -> str:
    """The test guest as a libvirt domain: TCG (nested KVM hangs here), direct kernel
    boot, the serial console to a file, a balloon reporting statistics every second;
    with ``virtio_mem_mib``, a virtio-mem device of that size beside ``memory_mib``
    (libvirt wants a NUMA cell and a maximum for it)."""
    metadata = ""
    if settings is not None:
        element = settings.to_xml().replace(
            "<settings", "<balloonist:settings xmlns:balloonist='urn:balloonist:domain:1'", 1
        )
        metadata = f"<metadata>{element}</metadata>"
    stats = "<stats period='1'/>" if balloon == "virtio" else ""
    # As 'vm start' does (deflate-on-oom): a guest about to OOM takes memory back first.
    autodeflate = " autodeflate='on'" if balloon == "virtio" else ""
    cmdline = f"console=ttyS0 panic=-1 quiet balloonist.work={work} balloonist.grow=0"
    if kernel_args:
        cmdline += " " + kernel_args
    share = ""
    if run:  # the host's / as the guest's root, read-only over 9p, and a program to run
        cmdline += " " + host_root_cmdline(run)
        share = (
            "<filesystem type='mount' accessmode='passthrough' multidevs='remap'>"
            f"<source dir='/'/><target dir='{HOST_ROOT_TAG}'/><readonly/></filesystem>"
        )
    hotplug, cpu, vmem = "", "", ""
    if virtio_mem_mib is not None:
        cmdline += " memhp_default_state=online_movable"
        hotplug = f"<maxMemory slots='1' unit='MiB'>{memory_mib + virtio_mem_mib}</maxMemory>"
        cpu = f"<cpu><numa><cell id='0' cpus='0' memory='{memory_mib}' unit='MiB'/></numa></cpu>"
        vmem = (
            "<memory model='virtio-mem'><target>"
            f"<size unit='MiB'>{virtio_mem_mib}</size><node>0</node>"
            "<block unit='KiB'>2048</block><requested unit='MiB'>0</requested>"
            "</target></memory>"
        )
    return f"""<domain type='qemu'>
  <name>{name}</name>{metadata}{hotplug}
  <memory unit='MiB'>{memory_mib + (virtio_mem_mib or 0)}</memory>
  <vcpu>{vcpus}</vcpu>{cpu}
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{assets.kernel.resolve()}</kernel><initrd>{assets.initrd.resolve()}</initrd>
    <cmdline>{cmdline}</cmdline></os>
  <on_poweroff>destroy</on_poweroff><on_crash>destroy</on_crash>
  <devices>
    <controller type='usb' model='none'/>
    <serial type='file'><source path='{serial_log}'/></serial>
    <memballoon model='{balloon}'{autodeflate}>{stats}</memballoon>{share}{vmem}
  </devices>
</domain>"""


@pytest.fixture
def domains(
    libvirtd: Libvirtd, guest_assets: GuestAssets, tmp_path: Path
) -> Iterator[DomainFactory]:
    factory = DomainFactory(guest_assets, tmp_path, f"bn{uuid.uuid4().hex[:6]}")
    try:
        yield factory
    finally:
        factory.remove_all()


class DomainFactory:
    """Defines and starts test-guest domains (persistent ones, as people's are), and
    destroys and undefines them all at the end."""

    def __init__(self, assets: GuestAssets, directory: Path, prefix: str) -> None:
        self.assets = assets
        self.directory = directory
        self.prefix = prefix
        self.names: list[str] = []

    def define(
        self,
        short: str,
        *,
        memory_mib: int = 512,
        work: str = "20@0",
        balloon: str = "virtio",
        settings: DomainSettings | None = None,
        start: bool = True,
        run: tuple[str, ...] = (),
        kernel_args: str = "",
        vcpus: int = 1,
        virtio_mem_mib: int | None = None,
    ) -> TestDomain:
        name = f"{self.prefix}-{short}"
        log = self.directory / f"{name}.serial"
        xml = self.directory / f"{name}.xml"
        xml.write_text(
            domain_xml(
                self.assets,
                name,
                log,
                memory_mib=memory_mib,
                work=work,
                balloon=balloon,
                settings=settings,
                run=run,
                kernel_args=kernel_args,
                vcpus=vcpus,
                virtio_mem_mib=virtio_mem_mib,
            )
        )
        virsh("define", str(xml))
        self.names.append(name)
        domain = TestDomain(name, log)
        if start:
            self.start(domain)
        return domain

    def start(self, domain: TestDomain) -> None:
        virsh("start", domain.name)
        self.wait_booted(domain)

    def wait_booted(self, domain: TestDomain) -> None:
        """Wait until a started domain's guest has booted (its drivers are loaded)."""
        wait_until(
            lambda: any("BALLOONIST-READY" in line for line in domain.lines()),
            BOOT_TIMEOUT_S,
            f"{domain.name} to boot",
        )

    def remove_all(self) -> None:
        for name in self.names:
            subprocess.run(["virsh", "-c", URI, "destroy", name], capture_output=True, check=False)
            subprocess.run(["virsh", "-c", URI, "undefine", name], capture_output=True, check=False)
