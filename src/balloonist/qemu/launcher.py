"""Starting, adopting, listing and stopping QEMU guests, with state in one directory.

Every VM has a directory ``STATE/vms/NAME/`` holding ``vm.json`` (what we know of it,
written atomically), the QMP socket ``qmp.sock`` and the serial log ``serial.log``. A
restarted daemon finds its VMs there. Guests we start get ``virtio-balloon-pci`` with
``deflate-on-oom=on`` (the guest may take balloon pages back rather than OOM-kill a
process) and ``free-page-reporting=on`` (pages the guest frees go back to the host
within seconds, with no balloon move), a QMP unix socket and a serial log, and run
detached (``-daemonize``).

An *agent* VM (``StartRequest.agent``) is also ready for the user-level balloon agent:
its RAM is a shared file, ``/dev/shm/balloonist-<state-dir hash>-NAME.ram``, which the
host can punch holes in (:mod:`balloonist.qemu.reclaim`), and it has a virtio-serial
port named :data:`~balloonist.agent.protocol.PORT_NAME` whose host end is the unix
socket ``agent.sock`` in its state directory. It keeps its virtio-balloon device, so
either mechanism can manage it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final, Literal

from balloonist.agent.protocol import PORT_NAME
from balloonist.atomicfile import write_atomic
from balloonist.cgroup import MemoryCgroup, host_memory_hierarchy, make_vm_cgroup, remove_vm_cgroup
from balloonist.errors import BalloonistError, ConfigError, FatalBackendError
from balloonist.host import read_meminfo
from balloonist.qemu.virtio_mem import BLOCK_BYTES as VMEM_BLOCK_BYTES
from balloonist.qemu.virtio_mem import VMEM_ID
from balloonist.units import MIB, format_size

Accel = Literal["auto", "kvm", "tcg"]

QEMU_BINARY: Final = "qemu-system-x86_64"
NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: How long a started QEMU may take to create its QMP socket.
START_TIMEOUT_S: Final = 20.0
#: How long a stopped QEMU may take to exit before it is killed.
STOP_TIMEOUT_S: Final = 10.0
#: A KVM that cannot run a 512-byte boot sector within this is not worth using. A working
#: KVM host runs the probe well under half a second (TCG here: 0.2 s); the nested KVM on
#: our CI machines takes 2.8 to 5 s, and then hangs while booting Linux.
KVM_PROBE_TIMEOUT_S: Final = 1.0
#: The smallest guest we start: a Linux kernel with our initramfs needs about this much.
MIN_GUEST_BYTES: Final = 64 * MIB
#: vm.json keys renamed to say what they count, and their names now.
_FORMER_KEYS: Final = {"cpu_min": "min_cpus", "cpu_max": "max_cpus"}
#: The balloon device's id, so its QOM path is /machine/peripheral/balloon0.
BALLOON_ID: Final = "balloon0"
#: Where agent VMs' RAM files go: a tmpfs, so the file is the guest's memory and a
#: punched hole is memory the host has back.
RAM_DIR: Final = Path("/dev/shm")
#: The 9p mount tag of the host's root for guests with ``share_root`` (init.sh knows it).
HOST_ROOT_TAG: Final = "hostroot"
#: x86 Linux refuses a longer kernel command line (COMMAND_LINE_SIZE).
MAX_CMDLINE_BYTES: Final = 2047


@dataclass(frozen=True)
class VMRecord:
    """What ``vm.json`` holds for one VM."""

    name: str
    memory_bytes: int
    min_bytes: int
    max_bytes: int
    shares: int
    qmp_socket: str
    serial_log: str | None
    pid: int | None  # None for a VM we adopted and did not start
    accel: str | None
    started_by_us: bool
    # Agent VMs only; defaults keep vm.json files from before agents loading.
    ram_file: str | None = None  # the guest's RAM, a shared file under RAM_DIR
    agent_socket: str | None = None  # host end of the agent's virtio-serial port
    # Processors (the CPU balloon, through the agent); None: not known (adopted VMs,
    # vm.json files from before).
    cpus: int | None = None
    min_cpus: int = 1
    max_cpus: int | None = None
    cpu_shares: int = 1000
    #: The memory cgroup balloonist made for it and started it in; None: none (an
    #: adopted VM, a host without the memory controller, vm.json files from before).
    cgroup: str | None = None
    #: virtio-mem VMs only: the hot-pluggable region, part of ``memory_bytes`` (the
    #: rest is boot memory); the daemon resizes the guest through it.
    virtio_mem_bytes: int | None = None

    @property
    def agent(self) -> bool:
        return self.agent_socket is not None

    def running(self) -> bool:
        if self.pid is None:
            return Path(self.qmp_socket).exists()
        return _pid_alive(self.pid)


@dataclass(frozen=True)
class StartRequest:
    name: str
    memory_bytes: int
    min_bytes: int = 0
    max_bytes: int | None = None
    shares: int = 1000
    cpus: int = 1
    min_cpus: int = 1
    max_cpus: int | None = None
    cpu_shares: int = 1000
    accel: Accel = "auto"
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    disk: Path | None = None
    deflate_on_oom: bool = True
    free_page_reporting: bool = True
    balloon: bool = True  # False only to test what happens without one
    agent: bool = False  # RAM in a shared file and a virtio-serial port for the agent
    share_root: bool = False  # the host's / as a read-only 9p share (test guests)
    #: A hot-pluggable region of this size beside ``memory_bytes`` (virtio-mem); the
    #: guest may grow to memory_bytes + virtio_mem_bytes.
    virtio_mem_bytes: int | None = None

    @property
    def total_bytes(self) -> int:
        """The most memory the guest can have: its boot memory and the region."""
        return self.memory_bytes + (self.virtio_mem_bytes or 0)

    def validate(self) -> None:
        check_name(self.name)
        if self.memory_bytes < MIN_GUEST_BYTES:
            raise ConfigError(f"--memory must be at least {format_size(MIN_GUEST_BYTES)}")
        if self.memory_bytes % MIB:
            raise ConfigError("--memory must be a whole number of MiB (QEMU's -m unit)")
        total = self.total_bytes
        limit = total if self.max_bytes is None else self.max_bytes
        if limit > total:
            raise ConfigError(
                f"--max {format_size(limit)} is above the VM's memory {format_size(total)}"
            )
        if self.min_bytes > limit:
            raise ConfigError(
                f"--min {format_size(self.min_bytes)} is above --max {format_size(limit)}"
            )
        self._validate_cpus()
        if self.shares <= 0:
            raise ConfigError(f"--shares must be positive, got {self.shares}")
        if (self.kernel is None) == (self.disk is None):
            raise ConfigError("give either --kernel (with --initrd) or --disk")
        for label, path in (
            ("--kernel", self.kernel),
            ("--initrd", self.initrd),
            ("--disk", self.disk),
        ):
            if path is not None and not path.is_file():
                raise ConfigError(f"{label}: no such file {path}")
        if len(kernel_cmdline(self.append).encode()) > MAX_CMDLINE_BYTES:
            raise ConfigError(f"the kernel command line is longer than {MAX_CMDLINE_BYTES} bytes")
        if self.virtio_mem_bytes is not None:
            self._validate_virtio_mem(self.virtio_mem_bytes)

    def _validate_cpus(self) -> None:
        if not 1 <= self.cpus <= 64:
            raise ConfigError(f"--cpus must be between 1 and 64, got {self.cpus}")
        cpu_limit = self.cpus if self.max_cpus is None else self.max_cpus
        if not 1 <= self.min_cpus <= cpu_limit <= self.cpus:
            raise ConfigError(
                f"--min-cpus {self.min_cpus} and --max-cpus {cpu_limit} must satisfy "
                f"1 <= min-cpus <= max-cpus <= --cpus {self.cpus}"
            )
        if self.cpu_shares <= 0:
            raise ConfigError(f"--cpu-shares must be positive, got {self.cpu_shares}")

    def _validate_virtio_mem(self, region_bytes: int) -> None:
        where = "--virtio-mem"
        if region_bytes <= 0 or region_bytes % VMEM_BLOCK_BYTES:
            raise ConfigError(
                f"must be a positive whole number of {format_size(VMEM_BLOCK_BYTES)} blocks",
                where=where,
            )
        host = read_meminfo().total_bytes
        if self.memory_bytes + region_bytes > host:
            raise ConfigError(
                f"{format_size(self.memory_bytes + region_bytes)} in all is above the "
                f"host's memory ({format_size(host)})",
                where=where,
            )
        if self.agent:
            raise ConfigError("an agent VM's RAM is one shared file; drop --agent", where=where)


def kernel_cmdline(append: str) -> str:
    return f"console=ttyS0 panic=-1 {append}".strip()


def ram_file_path(state_root: Path, name: str) -> Path:
    """Where an agent VM's RAM goes: unique per state directory and VM name."""
    return RAM_DIR / f"balloonist-{_unique_name(state_root, name)}.ram"


def _unique_name(state_root: Path, name: str) -> str:
    """The VM's name with a tag of its state directory: two state directories may
    each have a VM called ``web``."""
    tag = hashlib.sha256(str(state_root.resolve()).encode()).hexdigest()[:12]
    return f"{tag}-{name}"


def _create_ram_file(path: Path, memory_bytes: int) -> None:
    """An empty file, ours alone (0600), for QEMU to size; refused if there is no room."""
    try:
        free_bytes = shutil.disk_usage(path.parent).free
    except OSError as exc:
        raise ConfigError(f"agent VMs keep their RAM in {path.parent}: {exc.strerror}") from None
    if free_bytes < memory_bytes:
        raise ConfigError(
            f"agent VMs keep their RAM in {path.parent}, which has {format_size(free_bytes)} "
            f"free, less than the VM's {format_size(memory_bytes)}"
        )
    # Left over from a VM of the same name that died without 'vm stop' (start_vm has
    # checked it is not running).
    path.unlink(missing_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}") from None


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise ConfigError(
            f"VM name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit"
        )


def default_state_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "balloonist"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "balloonist"


class StateDir:
    """The directory where VMs are recorded."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def vm_dir(self, name: str) -> Path:
        check_name(name)
        return self.root / "vms" / name

    def save(self, record: VMRecord) -> None:
        directory = self.vm_dir(record.name)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / "vm.json", json.dumps(asdict(record), indent=2) + "\n")

    def load(self, name: str) -> VMRecord:
        path = self.vm_dir(name) / "vm.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"unknown VM {name!r} (see 'balloonist vm list')") from None
        except (OSError, ValueError) as exc:
            raise BalloonistError(f"{path}: unreadable VM record: {exc}") from None
        if isinstance(data, dict):
            for old, new in _FORMER_KEYS.items():  # a record written before the rename
                if old in data and new not in data:
                    data[new] = data.pop(old)
        try:
            return VMRecord(**data)
        except TypeError as exc:
            raise BalloonistError(f"{path}: VM record has the wrong fields: {exc}") from None

    def names(self) -> list[str]:
        vms = self.root / "vms"
        if not vms.is_dir():
            return []
        return sorted(p.name for p in vms.iterdir() if (p / "vm.json").is_file())

    def remove(self, name: str) -> None:
        shutil.rmtree(self.vm_dir(name), ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is gone for our purposes.
    try:
        status = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[0]
    except OSError:
        return True
    return status != "Z"


def qemu_binary() -> str:
    found = shutil.which(QEMU_BINARY)
    if found is None:
        raise FatalBackendError(
            f"{QEMU_BINARY} is not installed (Debian: apt-get install qemu-system-x86)"
        )
    return found


# A boot sector that writes 1 to the isa-debug-exit port: QEMU then exits with (1<<1)|1.
_PROBE_CODE: Final = bytes([0xB0, 0x01, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])
_PROBE_EXIT: Final = 3


def kvm_works(binary: str | None = None, timeout_s: float = KVM_PROBE_TIMEOUT_S) -> bool:
    """True if /dev/kvm opens and QEMU under KVM runs a boot sector within the deadline."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "probe.img"
        image.write_bytes(_PROBE_CODE + b"\0" * (510 - len(_PROBE_CODE)) + b"\x55\xaa")
        cmd = [
            binary or qemu_binary(),
            "-accel", "kvm", "-nodefaults", "-display", "none", "-m", "16",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-drive", f"file={image},format=raw,if=ide",
        ]  # fmt: skip
        try:
            done = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
        except (subprocess.TimeoutExpired, OSError):
            return False
        return done.returncode == _PROBE_EXIT


def resolve_accel(accel: Accel, binary: str) -> str:
    if accel == "auto":
        return "kvm" if kvm_works(binary) else "tcg"
    return accel


def build_command(
    request: StartRequest,
    *,
    binary: str,
    accel: str,
    directory: Path,
    ram_file: Path | None = None,
) -> list[str]:
    """The QEMU command line for a guest we start (detached, QMP, serial log, balloon).

    An agent VM needs ``ram_file``. Its machine is spelled out as ``pc`` (i440fx) because
    :mod:`balloonist.qemu.reclaim` maps guest frames to file offsets with pc's layout.
    """
    memory_mib = request.memory_bytes // MIB
    memory = f"{memory_mib}M"
    if request.virtio_mem_bytes is not None:
        memory += f",maxmem={request.total_bytes // MIB}M"
    cmd = [
        binary,
        "-name", request.name,
        "-accel", accel,
        "-m", memory,
        "-smp", str(request.cpus),
        "-nodefaults", "-no-user-config",
        "-display", "none",
        "-qmp", f"unix:{directory / 'qmp.sock'},server=on,wait=off",
        "-serial", f"file:{directory / 'serial.log'}",
        "-daemonize", "-pidfile", str(directory / "qemu.pid"),
    ]  # fmt: skip
    if accel == "kvm":
        cmd += ["-cpu", "host"]
    if request.balloon:
        oom = "on" if request.deflate_on_oom else "off"
        reporting = "on" if request.free_page_reporting else "off"
        cmd += [
            "-device",
            f"virtio-balloon-pci,id={BALLOON_ID},deflate-on-oom={oom},"
            f"free-page-reporting={reporting}",
        ]
    if request.agent:
        if ram_file is None:
            raise ValueError("an agent VM needs a RAM file")
        socket = directory / "agent.sock"
        cmd += [
            "-object",
            f"memory-backend-file,id=ram0,size={memory_mib}M,mem-path={ram_file},share=on",
            "-machine", "pc,memory-backend=ram0",
            "-device", "virtio-serial-pci,id=vserial0",
            "-chardev", f"socket,id=agent0,path={socket},server=on,wait=off",
            "-device", f"virtserialport,bus=vserial0.0,chardev=agent0,name={PORT_NAME}",
        ]  # fmt: skip
    if request.virtio_mem_bytes is not None:
        region_mib = request.virtio_mem_bytes // MIB
        cmd += [
            "-object", f"memory-backend-ram,id={VMEM_ID}-mem,size={region_mib}M",
            "-device", f"virtio-mem-pci,id={VMEM_ID},memdev={VMEM_ID}-mem,"
            f"block-size={VMEM_BLOCK_BYTES // MIB}M,requested-size=0",
        ]  # fmt: skip
    if request.share_root:
        cmd += [
            # multidevs=remap: / spans several host filesystems, whose inode numbers
            # would otherwise collide in the guest.
            "-fsdev", f"local,id={HOST_ROOT_TAG},path=/,security_model=none,readonly=on,"
            "multidevs=remap",
            "-device", f"virtio-9p-pci,fsdev={HOST_ROOT_TAG},mount_tag={HOST_ROOT_TAG}",
        ]  # fmt: skip
    if request.kernel is not None:
        cmd += ["-kernel", str(request.kernel)]
        if request.initrd is not None:
            cmd += ["-initrd", str(request.initrd)]
        append = request.append
        if request.virtio_mem_bytes is not None:
            # Plugged blocks come online movable, so they can be unplugged again.
            append = f"{append} memhp_default_state=online_movable"
        cmd += ["-append", kernel_cmdline(append)]
    if request.disk is not None:
        cmd += ["-drive", f"file={request.disk},if=virtio"]
    return cmd


def start_vm(state: StateDir, request: StartRequest) -> VMRecord:
    """Start a detached guest and record it; returns once its sockets (QMP, agent) exist."""
    request.validate()
    directory = state.vm_dir(request.name)
    if (directory / "vm.json").exists():
        existing = state.load(request.name)
        if existing.running():
            raise ConfigError(f"VM {request.name!r} is already running")
        if existing.started_by_us and existing.ram_file is not None:
            Path(existing.ram_file).unlink(missing_ok=True)
        state.remove(request.name)
    binary = qemu_binary()
    ram_file = ram_file_path(state.root, request.name) if request.agent else None
    if ram_file is not None:
        _create_ram_file(ram_file, request.memory_bytes)
    directory.mkdir(parents=True, exist_ok=True)
    accel = resolve_accel(request.accel, binary)
    cmd = build_command(request, binary=binary, accel=accel, directory=directory, ram_file=ram_file)
    sockets = [directory / "qmp.sock"]
    if request.agent:
        sockets.append(directory / "agent.sock")

    cgroup = _vm_cgroup(_unique_name(state.root, request.name))

    def give_up() -> None:
        state.remove(request.name)
        if ram_file is not None:
            ram_file.unlink(missing_ok=True)
        if cgroup is not None:
            remove_vm_cgroup(cgroup.path)

    try:
        done = _run_in(cgroup, cmd)
    except subprocess.SubprocessError:  # it could not join its cgroup: run it without
        if cgroup is not None:
            remove_vm_cgroup(cgroup.path)
        cgroup = None
        done = _run_in(None, cmd)
    if done.returncode != 0:
        give_up()
        lines = done.stderr.strip().splitlines()
        raise FatalBackendError(
            f"QEMU did not start {request.name!r}: {lines[-1] if lines else done.returncode}"
        )
    pid = int((directory / "qemu.pid").read_text().strip())
    deadline = time.monotonic() + START_TIMEOUT_S
    while not all(socket.exists() for socket in sockets):
        if time.monotonic() > deadline or not _pid_alive(pid):
            _terminate(pid)
            give_up()
            raise FatalBackendError(f"QEMU for {request.name!r} never opened its sockets")
        time.sleep(0.05)
    record = VMRecord(
        name=request.name,
        memory_bytes=request.total_bytes,
        # A virtio-mem guest never goes below its boot memory, which cannot be unplugged.
        min_bytes=request.min_bytes
        if request.virtio_mem_bytes is None
        else max(request.min_bytes, request.memory_bytes),
        max_bytes=request.total_bytes if request.max_bytes is None else request.max_bytes,
        shares=request.shares,
        qmp_socket=str(directory / "qmp.sock"),
        serial_log=str(directory / "serial.log"),
        pid=pid,
        accel=accel,
        started_by_us=True,
        ram_file=None if ram_file is None else str(ram_file),
        agent_socket=str(directory / "agent.sock") if request.agent else None,
        cpus=request.cpus,
        min_cpus=request.min_cpus,
        max_cpus=request.max_cpus,
        cpu_shares=request.cpu_shares,
        cgroup=None if cgroup is None else str(cgroup.path),
        virtio_mem_bytes=request.virtio_mem_bytes,
    )
    state.save(record)
    return record


def _run_in(cgroup: MemoryCgroup | None, cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run QEMU (it daemonizes) in ``cgroup``, so every page it ever touches is
    charged there; SubprocessError if it could not join it."""
    join = None if cgroup is None else lambda: cgroup.join(os.getpid())
    return subprocess.run(cmd, capture_output=True, text=True, check=False, preexec_fn=join)


def _vm_cgroup(name: str) -> MemoryCgroup | None:
    """A memory cgroup of the VM's own (``name``: unique on the host), so the host can
    page it if its balloon fails (``daemon/host_reclaim.py``); None where the host has
    no memory controller or will not let us make one (then it is never paged by the
    host)."""
    hierarchy = host_memory_hierarchy()
    if hierarchy is None:
        return None
    try:
        return make_vm_cgroup(hierarchy, name)
    except OSError:
        return None


def adopt_vm(
    state: StateDir,
    name: str,
    socket: Path,
    *,
    memory_bytes: int,
    min_bytes: int = 0,
    max_bytes: int | None = None,
    shares: int = 1000,
) -> VMRecord:
    """Record a QEMU started elsewhere (libvirt, by hand) by its QMP socket."""
    check_name(name)
    if not socket.exists():
        raise ConfigError(f"--qmp: no socket at {socket}")
    limit = memory_bytes if max_bytes is None else max_bytes
    if min_bytes > limit:
        raise ConfigError(f"--min {format_size(min_bytes)} is above --max {format_size(limit)}")
    record = VMRecord(
        name=name,
        memory_bytes=memory_bytes,
        min_bytes=min_bytes,
        max_bytes=limit,
        shares=shares,
        qmp_socket=str(socket),
        serial_log=None,
        pid=None,
        accel=None,
        started_by_us=False,
    )
    state.save(record)
    return record


def stop_vm(state: StateDir, name: str) -> None:
    """Stop a VM we started (SIGTERM, then SIGKILL) and forget it; forget an adopted one."""
    record = state.load(name)
    if record.started_by_us and record.pid is not None:
        _terminate(record.pid)
    if record.started_by_us and record.cgroup is not None:
        remove_vm_cgroup(Path(record.cgroup))
    if record.started_by_us and record.ram_file is not None:
        Path(record.ram_file).unlink(missing_ok=True)
    state.remove(name)


def _terminate(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + STOP_TIMEOUT_S
        time.sleep(0.05)
