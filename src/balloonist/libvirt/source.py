"""libvirt domains as the daemon's VMs: the libvirt adapter of ``VmSource``.

Each period the running domains are listed again, so a domain started, stopped,
crashed or migrated away is picked up or dropped within a period. A domain is managed
when it opted in (``balloonist libvirt manage NAME`` sets ``managed="yes"`` in its
metadata) or when host.toml says ``manage_all_domains``, and only if it has a virtio
balloon whose driver the guest has loaded (a guest still booting is picked up once it
has; one without the driver is listed with that reason). Its settings come from its
metadata first, then host.toml's ``[vms.NAME]``, then the defaults (no minimum, its
whole memory as maximum, 1000 shares).

A domain with the agent's channel (``balloonist libvirt prepare --agent``) whose QEMU
runs on this host with its RAM in a shared file on a tmpfs is managed through the
agent, as ``vm start --agent`` VMs are; otherwise through its virtio balloon (and
the reason is logged once).

While libvirtd cannot be reached (restarting), the domains listed last stay managed:
they still run, and their ports fail and reconnect on their own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from balloonist.daemon.backend import merge_changes
from balloonist.daemon.config import DaemonConfig, check_fits, with_overrides
from balloonist.daemon.control import GuestChange
from balloonist.daemon.qemu_hv import agent_port
from balloonist.daemon.vm_ports import VcpuHost, VmPort
from balloonist.daemon.vm_source import SourceKind, with_change
from balloonist.errors import ConfigError
from balloonist.libvirt.connection import Libvirt, LibvirtError
from balloonist.libvirt.domain_xml import DomainFacts, DomainSettings, parse_domain
from balloonist.libvirt.metadata import write_settings
from balloonist.libvirt.port import (
    DomainBalloon,
    DomainControl,
    DomainVirtioMem,
    LibvirtVcpuHost,
    driver_seen,
)
from balloonist.libvirt.process import (
    MEMORY_FILESYSTEMS,
    PROC,
    RUN_DIR,
    command_line,
    domain_pid,
    filesystem_type,
    shared_ram_file,
)
from balloonist.qemu.launcher import VMRecord

log = logging.getLogger("balloonist.daemon")


@dataclass(frozen=True)
class DomainListing:
    """One running domain and whether balloonist manages it; ``reason`` if not."""

    facts: DomainFacts
    managed: bool
    reason: str = ""


def listing(facts: DomainFacts, manage_all: bool) -> DomainListing:
    """Whether a domain is managed, and why not (pure)."""
    if not facts.balloon_usable:
        model = facts.balloon_model
        what = "no <memballoon>" if model is None else f"<memballoon model='{model}'>"
        return DomainListing(facts, False, f"no usable balloon ({what})")
    if not (facts.settings.managed or manage_all):
        return DomainListing(facts, False, f"not opted in (balloonist libvirt manage {facts.name})")
    return DomainListing(facts, True)


def domain_record(
    facts: DomainFacts, config: DaemonConfig, *, pid: int | None = None, ram_file: str | None = None
) -> VMRecord:
    """The domain as the daemon manages it: host.toml's ``[vms.NAME]`` under the
    domain's own metadata. ConfigError if the settings do not fit the domain.

    With its agent's channel, its QEMU ``pid`` and its shared ``ram_file``, it is an
    agent VM (balloon and CPU balloon through the agent); else its virtio balloon."""
    agent = facts.agent_socket is not None and ram_file is not None and pid is not None
    base = VMRecord(
        name=facts.name,
        memory_bytes=facts.memory_bytes,
        min_bytes=0,
        max_bytes=facts.memory_bytes,
        shares=1000,
        qmp_socket="",  # libvirt holds the monitor; the port asks libvirt
        serial_log=None,
        pid=pid,
        accel=None,
        started_by_us=False,
        ram_file=ram_file if agent else None,
        agent_socket=facts.agent_socket if agent else None,
        cpus=facts.vcpus if agent else None,
        virtio_mem_bytes=None if agent else facts.virtio_mem_bytes,
    )
    record = with_change(with_overrides(base, config), as_change(facts.settings))
    check_fits(record, where=f"{facts.name}: metadata")
    if record.virtio_mem_bytes is not None:  # its boot memory cannot be unplugged
        boot = record.memory_bytes - record.virtio_mem_bytes
        record = replace(record, min_bytes=max(record.min_bytes, boot))
    return record


class LibvirtVms:
    """The running libvirt domains balloonist manages."""

    def __init__(
        self,
        libvirt: Libvirt,
        config: DaemonConfig,
        *,
        run_dir: Path = RUN_DIR,
        proc: Path = PROC,
    ) -> None:
        """``run_dir`` and ``proc``: where libvirt's pid files and the host's
        processes are (other places in tests)."""
        self.libvirt = libvirt
        self.config = config
        self.run_dir = run_dir
        self.proc = proc
        self._last: list[VMRecord] = []
        self._unreachable = False
        self._skipped: dict[str, str] = {}  # name -> why, logged once
        self._drivers: set[str] = set()  # running domains whose balloon driver has reported

    @property
    def kind(self) -> SourceKind:
        return "libvirt"

    def domains(self) -> list[DomainListing]:
        """Every running domain, managed or not (LibvirtError if libvirt cannot say)."""
        flags = self.libvirt.lib.VIR_CONNECT_LIST_DOMAINS_ACTIVE
        xmls = self.libvirt.call(lambda conn: [d.XMLDesc(0) for d in conn.listAllDomains(flags)])
        manage_all = self.config.daemon.manage_all_domains
        out = []
        for xml in xmls:
            try:
                out.append(self._with_driver(listing(parse_domain(xml), manage_all)))
            except ConfigError as exc:
                self._skip(exc.where or "a domain", str(exc))
        self._drivers &= {d.facts.name for d in out}  # forget the domains that stopped
        return sorted(out, key=lambda d: d.facts.name)

    def _with_driver(self, found: DomainListing) -> DomainListing:
        """A domain it would manage, unmanaged while its guest shows no balloon driver:
        a balloon without one never moves. Asked until the driver has reported once."""
        name = found.facts.name
        if not found.managed or name in self._drivers:
            return found
        try:
            raw = self.libvirt.domain_call(name, lambda dom: dom.memoryStats())
        except LibvirtError as exc:  # stopped since it was listed, most likely
            return DomainListing(found.facts, False, f"its balloon cannot be read: {exc}")
        seen = driver_seen(raw if isinstance(raw, dict) else {})
        if seen is False:
            why = "no balloon driver in the guest (it has sent no statistics)"
            return DomainListing(found.facts, False, why)
        self._drivers.add(name)  # None: libvirt cannot tell; the pacer judges the balloon
        return found

    def records(self) -> list[VMRecord]:
        if self.libvirt.events is not None:
            for name, words in self.libvirt.events.take():
                log.info("%s: %s", name, words)
        try:
            found = self.domains()
        except LibvirtError as exc:
            if not self._unreachable:
                log.warning("libvirt at %s: %s; keeping the domains known", self.libvirt.uri, exc)
            self._unreachable = True
            return list(self._last)
        if self._unreachable:
            log.info("libvirt at %s answers again", self.libvirt.uri)
            self._unreachable = False
        records = []
        for d in found:
            if not d.managed:
                self._skip(d.facts.name, d.reason)
                continue
            try:
                records.append(self._record(d.facts))
            except ConfigError as exc:
                self._skip(d.facts.name, str(exc))
                continue
            self._skipped.pop(d.facts.name, None)
        self._last = records
        return records

    def _record(self, facts: DomainFacts) -> VMRecord:
        pid = domain_pid(facts.name, self.run_dir)
        ram_file = None
        if facts.agent_socket is not None and pid is not None:
            ram_file = shared_ram_file(command_line(pid, self.proc))
            fs = None if ram_file is None else filesystem_type(ram_file, self._mounts())
            if ram_file is None:
                self._skip_agent(facts.name, "no shared RAM file (libvirt prepare --agent)")
            elif fs not in MEMORY_FILESYSTEMS:
                # Measured: on ext4 only about half the pages punched stayed holes, and
                # the balloon stalled; on tmpfs every one did.
                self._skip_agent(
                    facts.name,
                    f"its RAM file {ram_file} is on {fs}, not a tmpfs (qemu.conf: "
                    'memory_backing_dir = "/dev/shm/libvirt")',
                )
                ram_file = None
        elif facts.agent_socket is not None:
            self._skip_agent(facts.name, "its QEMU process is not on this host")
        return domain_record(facts, self.config, pid=pid, ram_file=ram_file)

    def _mounts(self) -> str:
        try:
            return (self.proc / "mounts").read_text()
        except OSError:
            return ""

    def _skip_agent(self, name: str, why: str) -> None:
        key = f"{name} agent"
        if self._skipped.get(key) != why:
            log.info("%s: agent channel not used, %s; managed by its virtio balloon", name, why)
            self._skipped[key] = why

    def _skip(self, name: str, why: str) -> None:
        if self._skipped.get(name) != why:
            log.info("%s: not managed: %s", name, why)
            self._skipped[name] = why

    def save_change(self, name: str, change: GuestChange, managed: VMRecord | None) -> None:
        """Write the change into the domain's metadata, live and persistent."""
        write_settings(self.libvirt, name, lambda s: _changed(s, change))

    def port(self, record: VMRecord, clock: Callable[[], float]) -> VmPort:
        if record.virtio_mem_bytes is not None:
            return DomainVirtioMem(self.libvirt, record.name, record.virtio_mem_bytes)
        if record.agent_socket is None or record.ram_file is None or record.pid is None:
            return DomainBalloon(self.libvirt, record.name)
        vcpus = record.cpus or 1
        control = DomainControl(self.libvirt, record.name, record.pid, vcpus)
        return agent_port(record, clock, control, vcpus=vcpus)

    def vcpu_host(self) -> VcpuHost:
        return LibvirtVcpuHost(self.libvirt)

    def close(self) -> None:
        self.libvirt.close()


def as_change(settings: DomainSettings) -> GuestChange:
    """The settings a domain's metadata sets, as a change over the other layers."""
    return GuestChange(
        min_bytes=settings.min_bytes,
        max_bytes=settings.max_bytes,
        shares=settings.shares,
        min_cpus=settings.min_cpus,
        max_cpus=settings.max_cpus,
        cpu_shares=settings.cpu_shares,
    )


def _changed(settings: DomainSettings, change: GuestChange) -> DomainSettings:
    """The settings with each field the change gives replaced."""
    merged = merge_changes(as_change(settings), change)
    return DomainSettings(managed=settings.managed, **asdict(merged))


__all__ = ["DomainListing", "LibvirtVms", "as_change", "domain_record", "listing"]
