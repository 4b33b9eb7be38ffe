"""What a domain's XML needs for balloonist, worked out from the XML itself (pure).

For every managed domain, a virtio balloon that:
- deflates on its own when the guest is about to run out (``autodeflate='on'``, as
  ``balloonist vm start`` gives QEMU's ``deflate-on-oom``): a balloon must never be
  what makes the OOM killer pick a process;
- reports free pages to the host (``freePageReporting='on'``), so memory a guest
  frees goes back to the host without a balloon move;
- reports statistics every second (``<stats period='1'/>``), which the policy reads.

With the agent (``--agent``), also:
- the agent's virtio-serial channel, ``org.balloonist.agent.0``, on a unix socket
  libvirt creates for the daemon to connect to (libvirt picks its path, under
  ``/var/lib/libvirt/qemu/channel/target/``, when the domain starts; the daemon reads
  it from the running domain's XML);
- guest RAM in a shared file (``<memoryBacking><source type='file'/><access
  mode='shared'/>``), so the host can punch the holes the agent reports.

The result differs from the input only where something was missing or set otherwise.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from balloonist.errors import ConfigError
from balloonist.libvirt.domain_xml import AGENT_CHANNEL, METADATA_PREFIX, NAMESPACE_URI

STATS_PERIOD_S = 1


@dataclass(frozen=True)
class Prepared:
    xml: str
    changes: tuple[str, ...]  # one line per change, for people


def prepare(xml: str, *, agent: bool) -> Prepared:
    """The domain XML with what balloonist needs; ConfigError if it cannot have it."""
    ET.register_namespace(METADATA_PREFIX, NAMESPACE_URI)
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ConfigError(f"domain XML does not parse: {exc}") from None
    name = root.findtext("name") or "?"
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    changes: list[str] = []
    _balloon(devices, name, changes)
    if agent:
        _shared_memory(root, changes)
        _agent_channel(devices, changes)
    return Prepared(ET.tostring(root, encoding="unicode"), tuple(changes))


def _set(element: ET.Element, key: str, value: str, what: str, changes: list[str]) -> None:
    if element.get(key) != value:
        changes.append(f"{what}: {key}='{value}'")
        element.set(key, value)


def _balloon(devices: ET.Element, name: str, changes: list[str]) -> None:
    balloon = devices.find("memballoon")
    if balloon is None:
        balloon = ET.SubElement(devices, "memballoon", model="virtio")
        changes.append("memballoon: added, model='virtio'")
    elif balloon.get("model") == "none":
        raise ConfigError(
            "has <memballoon model='none'>: balloonist cannot manage it; remove that "
            "element (libvirt then adds a virtio balloon) and run prepare again",
            where=name,
        )
    _set(balloon, "autodeflate", "on", "memballoon", changes)
    _set(balloon, "freePageReporting", "on", "memballoon", changes)
    stats = balloon.find("stats")
    if stats is None:
        stats = ET.SubElement(balloon, "stats")
    _set(stats, "period", str(STATS_PERIOD_S), "memballoon stats", changes)


def _shared_memory(root: ET.Element, changes: list[str]) -> None:
    backing = root.find("memoryBacking")
    if backing is None:
        backing = ET.Element("memoryBacking")
        # libvirt wants it next to <memory>; after <currentMemory> if there is one
        after = root.find("currentMemory")
        if after is None:
            after = root.find("memory")
        index = list(root).index(after) + 1 if after is not None else len(root)
        root.insert(index, backing)
    source = backing.find("source")
    if source is None:
        source = ET.SubElement(backing, "source")
    _set(source, "type", "file", "memoryBacking source", changes)
    access = backing.find("access")
    if access is None:
        access = ET.SubElement(backing, "access")
    _set(access, "mode", "shared", "memoryBacking access", changes)


def _agent_channel(devices: ET.Element, changes: list[str]) -> None:
    for channel in devices.findall("channel"):
        target = channel.find("target")
        if target is not None and target.get("name") == AGENT_CHANNEL:
            return  # there already, wherever its socket is
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "source", mode="bind")  # libvirt picks the path
    ET.SubElement(channel, "target", type="virtio", name=AGENT_CHANNEL)
    changes.append(f"channel: added, {AGENT_CHANNEL} (a unix socket libvirt places)")


__all__ = ["Prepared", "prepare"]
