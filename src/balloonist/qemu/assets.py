"""Guest assets for tests and demos, built from Debian packages.

``ensure_guest_assets`` returns a kernel and an initramfs for small Linux guests:

- the kernel is Debian's (``linux-image-amd64`` names the current one), fetched with
  ``apt-get download`` and unpacked with ``dpkg-deb -x``;
- the initramfs holds busybox (``busybox-static``), the virtio modules in load order,
  the 9p modules, our ``init`` and ``touchmem`` (a workload compiled here, statically,
  with gcc).

A guest may instead take the host's own filesystem, shared read-only over virtio-9p, as
its root (``host_root``): then it can run the host's ``python3`` and see this repository
at the same path, and ``run`` names a program it runs once booted. That is for test
guests on a development machine only: the guest can read every file the host can.

The initramfs is written by :func:`write_cpio` (the kernel's "newc" format), so no
root, no ``cpio`` tool and no loop devices are needed. Everything is cached in one
directory and rebuilt only when missing; a build goes to a temporary directory and is
renamed into place, so an interrupted build never leaves a half cache behind.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final

from balloonist.errors import BalloonistError, ConfigError
from balloonist.qemu.launcher import Accel, StartRequest

#: The modules the guests need, in load order (each depends on those before it).
GUEST_MODULES: Final = (
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/drivers/virtio/virtio_balloon.ko",
    "kernel/drivers/char/virtio_console.ko",
    "kernel/drivers/virtio/virtio_mem.ko",
)
#: What a guest with the host's filesystem as its root loads after GUEST_MODULES
#: (``depends=`` of the Debian 6.1 modules: 9p needs 9pnet, fscache, netfs).
NINEP_MODULES: Final = (
    "kernel/fs/netfs/netfs.ko",
    "kernel/fs/fscache/fscache.ko",
    "kernel/net/9p/9pnet.ko",
    "kernel/net/9p/9pnet_virtio.ko",
    "kernel/fs/9p/9p.ko",
)
KERNEL_META_PACKAGE: Final = "linux-image-amd64"
BUSYBOX_PACKAGE: Final = "busybox-static"
MANIFEST: Final = "assets.json"
#: Bump when the initramfs contents change, so old caches are rebuilt.
ASSETS_FORMAT: Final = 5
#: Where a host-root guest may find the host's Python, first match wins.
HOST_PYTHONS: Final = ("/usr/bin/python3", "/usr/local/bin/python3")
#: What may go into a guest's command line unquoted: the kernel splits it at blanks and
#: init never evaluates it, but quotes and control characters have no business there.
_CMDLINE_VALUE_RE: Final = re.compile(r"^[A-Za-z0-9_./:=,+@%-]{1,200}$")
#: Host directories a host-root guest does not see: init mounts its own there.
GUEST_OWN_DIRS: Final = ("/tmp/", "/run/", "/dev/", "/proc/", "/sys/")

Progress = Callable[[str], None]


class AssetError(BalloonistError):
    """The guest assets could not be built (a missing tool or package, a failed step)."""


@dataclass(frozen=True)
class GuestAssets:
    kernel: Path
    initrd: Path
    kernel_version: str

    def start_request(
        self,
        name: str,
        memory_bytes: int,
        *,
        work: str | None = None,
        grow_mib_s: float = 0.0,
        accel: Accel = "auto",
        run: Sequence[str] = (),
        host_root: bool = False,
        balloon_driver: bool = True,
        **request: Any,
    ) -> StartRequest:
        """A request to boot the test guest, running ``touchmem WORK GROW`` if given.

        ``run`` is the argv of a program on the host's filesystem that the guest runs
        once booted (its output goes to the serial log); it implies ``host_root``, the
        host's filesystem as the guest's root, read-only over 9p. Without
        ``balloon_driver`` the guest never loads its balloon driver: the balloon device
        is there, but it never moves.
        """
        append = "quiet" if balloon_driver else "quiet balloonist.noballoon"
        if work:
            append += f" balloonist.work={work} balloonist.grow={grow_mib_s:g}"
        share = host_root or bool(run)
        if share:
            append += " " + host_root_cmdline(run)
        return StartRequest(
            name=name,
            memory_bytes=memory_bytes,
            accel=accel,
            kernel=self.kernel,
            initrd=self.initrd,
            append=append,
            share_root=share,
            **request,
        )


def host_root_cmdline(run: Sequence[str] = ()) -> str:
    """Kernel parameters for init: the 9p root, and ``run`` as one parameter per word."""
    words = ["balloonist.root=9p"]
    if run:
        program = run[0]
        if program.startswith(GUEST_OWN_DIRS):
            raise ConfigError(f"the guest has its own /{program.split('/')[1]}: {program}")
        if not program.startswith("/") or not Path(program).is_file():
            raise ConfigError(f"the guest's program must be a file by absolute path: {program!r}")
        if not os.access(program, os.X_OK):
            raise ConfigError(f"the guest's program is not executable: {program}")
        for value in run:
            if not _CMDLINE_VALUE_RE.match(value):
                raise ConfigError(
                    f"cannot pass {value!r} to the guest: "
                    "use 1-200 of A-Z a-z 0-9 _ . / : = , + @ % -"
                )
        words.append(f"balloonist.run={program}")
        words += [f"balloonist.arg={value}" for value in run[1:]]
    return " ".join(words)


def host_python() -> str:
    """The host's own python3, which a host-root guest can run at the same path."""
    for candidate in HOST_PYTHONS:
        if os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError(f"no host python3 a guest could run (looked for {', '.join(HOST_PYTHONS)})")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "balloonist" / "guest"


def cached_assets(cache_dir: Path) -> GuestAssets | None:
    """The assets in ``cache_dir`` if they are complete and current, else None."""
    try:
        manifest = json.loads((cache_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("format") != ASSETS_FORMAT:
        return None
    assets = GuestAssets(
        kernel=cache_dir / "vmlinuz",
        initrd=cache_dir / "initrd.gz",
        kernel_version=str(manifest.get("kernel_version", "")),
    )
    if assets.kernel.is_file() and assets.initrd.is_file():
        return assets
    return None


def ensure_guest_assets(cache_dir: Path, progress: Progress | None = None) -> GuestAssets:
    """Return cached assets, building them first if they are missing."""
    found = cached_assets(cache_dir)
    if found is not None:
        return found
    say = progress or (lambda _msg: None)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=cache_dir.parent) as tmp:
        work = Path(tmp)
        out = work / "out"
        out.mkdir()
        version = _build(work, out, say)
        (out / MANIFEST).write_text(
            json.dumps({"format": ASSETS_FORMAT, "kernel_version": version}) + "\n",
            encoding="utf-8",
        )
        if cache_dir.exists():
            shutil.rmtree(cache_dir)  # incomplete or outdated: replaced whole
        out.rename(cache_dir)
    say(f"guest assets ready in {cache_dir}")
    built = cached_assets(cache_dir)
    assert built is not None  # just written
    return built


def _build(work: Path, out: Path, say: Progress) -> str:
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "gcc"):
        if shutil.which(tool) is None:
            raise AssetError(f"building guest assets needs {tool!r}, which is not installed")
    kernel_pkg = _kernel_package()
    say(f"downloading {kernel_pkg} and {BUSYBOX_PACKAGE} with apt-get")
    debs = _download([kernel_pkg, BUSYBOX_PACKAGE], work)
    root = work / "root"
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(root)])
    version = kernel_pkg.removeprefix("linux-image-")
    shutil.copyfile(root / "boot" / f"vmlinuz-{version}", out / "vmlinuz")
    say("compiling the guest workload (touchmem) with gcc -static")
    touchmem = work / "touchmem"
    source = resources.files("balloonist.qemu.guest").joinpath("touchmem.c")
    with resources.as_file(source) as src:
        _run(["gcc", "-static", "-O2", "-o", str(touchmem), str(src)])
    init = resources.files("balloonist.qemu.guest").joinpath("init.sh").read_bytes()
    modules = root / "lib" / "modules" / version
    entries: list[CpioEntry] = [
        CpioEntry.directory(name) for name in ("bin", "dev", "proc", "sys", "tmp", "lib")
    ]
    entries.append(CpioEntry.directory("lib/modules"))
    entries.append(CpioEntry.char_device("dev/console", major=5, minor=1))
    entries.append(CpioEntry.file("init", init, mode=0o755))
    entries.append(CpioEntry.file("bin/busybox", (root / "bin" / "busybox").read_bytes(), 0o755))
    entries.append(CpioEntry.file("bin/touchmem", touchmem.read_bytes(), mode=0o755))
    loaded: list[str] = []
    for module in (*GUEST_MODULES, *NINEP_MODULES):
        path = modules / module
        if not path.is_file():
            raise AssetError(f"{kernel_pkg} has no {module}")
        data = path.read_bytes()
        # init loads them in this order with insmod, which does not resolve dependencies:
        # a newer kernel that adds one must fail here, not in every guest.
        missing = [dep for dep in module_depends(data) if dep not in loaded]
        if missing:
            raise AssetError(f"{module} in {kernel_pkg} needs {', '.join(missing)} loaded first")
        loaded.append(module_name(module))
        entries.append(CpioEntry.file(f"lib/modules/{path.name}", data, 0o644))
    say("writing the initramfs")
    with gzip.open(out / "initrd.gz", "wb", compresslevel=6) as fh:
        fh.write(write_cpio(entries))
    return version


def module_name(path: str) -> str:
    """The kernel's name for a module file: ``kernel/net/9p/9pnet-x.ko`` -> ``9pnet_x``."""
    return Path(path).name.removesuffix(".ko").replace("-", "_")


def module_depends(data: bytes) -> list[str]:
    """The ``depends=`` list in a module's ``.modinfo`` (NUL-separated key=value strings)."""
    match = re.search(rb"\0depends=([^\0]*)\0", data)
    if match is None:
        return []
    return [name for name in match.group(1).decode("ascii", "replace").split(",") if name]


def _kernel_package() -> str:
    """The versioned kernel package the meta-package currently points at."""
    text = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    match = re.search(r"Depends:\s*(linux-image-[0-9][\w.+-]*-amd64)\b", text)
    if match is None:
        raise AssetError(
            f"apt-cache does not know {KERNEL_META_PACKAGE}; run 'apt-get update' first"
        )
    return match.group(1)


def _download(packages: list[str], into: Path) -> list[Path]:
    _run(["apt-get", "download", "-qq", *packages], cwd=into)
    debs = sorted(into.glob("*.deb"))
    if len(debs) != len(packages):
        raise AssetError(f"apt-get download fetched {len(debs)} of {len(packages)} packages")
    return debs


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise AssetError(f"{cmd[0]}: {exc}") from exc
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise AssetError(f"{' '.join(cmd[:3])} failed: {detail[-1] if detail else done.returncode}")
    return done.stdout


# -- the initramfs archive ---------------------------------------------------------------


@dataclass(frozen=True)
class CpioEntry:
    name: str
    mode: int  # file type and permission bits, as in st_mode
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0

    @classmethod
    def file(cls, name: str, data: bytes, mode: int = 0o644) -> CpioEntry:
        return cls(name, stat.S_IFREG | mode, data)

    @classmethod
    def directory(cls, name: str) -> CpioEntry:
        return cls(name, stat.S_IFDIR | 0o755)

    @classmethod
    def char_device(cls, name: str, *, major: int, minor: int) -> CpioEntry:
        return cls(name, stat.S_IFCHR | 0o600, rdev_major=major, rdev_minor=minor)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def write_cpio(entries: Iterable[CpioEntry]) -> bytes:
    """An archive in the "newc" format the kernel unpacks into its initial rootfs.

    Each entry is a 110-byte ASCII header (magic 070701, then 13 fields as 8 hex
    digits), the NUL-terminated name and the data, both padded to 4 bytes; a
    ``TRAILER!!!`` entry ends the archive.
    """
    parts: list[bytes] = []
    all_entries = [*entries, CpioEntry("TRAILER!!!", 0)]
    for ino, entry in enumerate(all_entries, start=1):
        name = entry.name.encode() + b"\0"
        is_dir = stat.S_ISDIR(entry.mode)
        fields = (
            ino,
            entry.mode,
            0,  # uid
            0,  # gid
            2 if is_dir else 1,  # nlink
            0,  # mtime: fixed, so the archive is reproducible
            len(entry.data),
            0,  # devmajor
            0,  # devminor
            entry.rdev_major,
            entry.rdev_minor,
            len(name),
            0,  # check
        )
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        parts += [header, name, _pad4(len(header) + len(name)), entry.data, _pad4(len(entry.data))]
    return b"".join(parts)
