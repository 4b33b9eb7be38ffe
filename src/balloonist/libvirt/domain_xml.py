"""What balloonist reads from a libvirt domain's XML, and the settings it keeps there.

Pure: text in, frozen values out, no libvirt. A domain's balloonist settings live in
its own ``<metadata>``, under our namespace, so they travel with the domain
(migration, backups, ``virsh dumpxml`` shows them)::

    <metadata>
      <balloonist:settings xmlns:balloonist="urn:balloonist:domain:1"
          managed="yes" min_bytes="268435456" max_bytes="1073741824" shares="2000"/>
    </metadata>

Sizes are bytes, so the XML needs no unit parsing. Anyone with write access to the
domain can edit them, so they are checked like any input: a bad value is a
:class:`~balloonist.errors.ConfigError` naming the domain and the attribute.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from balloonist.errors import ConfigError
from balloonist.units import KIB

#: Our XML namespace in domain metadata, and the prefix libvirt writes it with.
NAMESPACE_URI = "urn:balloonist:domain:1"
METADATA_PREFIX = "balloonist"
#: The agent's virtio-serial port name (as ``balloonist vm start --agent`` gives it).
AGENT_CHANNEL = "org.balloonist.agent.0"
#: memballoon models that are a virtio balloon a guest driver can serve.
VIRTIO_BALLOONS = frozenset({"virtio", "virtio-transitional", "virtio-non-transitional"})
#: The largest value an attribute may hold (a guest of 16 EiB is not a guest).
_MAX_VALUE = 2**62

#: The settings' attributes besides ``managed``, in the order they are written.
_FIELDS = ("min_bytes", "max_bytes", "shares", "min_cpus", "max_cpus", "cpu_shares")
#: What those attributes were called before; domains annotated then are still read.
_FORMER = {"min_cpus": "cpu_min", "max_cpus": "cpu_max"}

_UNIT_BYTES = {
    "b": 1,
    "bytes": 1,
    "k": KIB,
    "kib": KIB,
    "kb": 1000,
    "m": KIB**2,
    "mib": KIB**2,
    "mb": 1000**2,
    "g": KIB**3,
    "gib": KIB**3,
    "gb": 1000**3,
    "t": KIB**4,
    "tib": KIB**4,
    "tb": 1000**4,
}


@dataclass(frozen=True)
class DomainSettings:
    """A domain's balloonist settings; None: not set here (host.toml or the default)."""

    managed: bool = False
    min_bytes: int | None = None
    max_bytes: int | None = None
    shares: int | None = None
    min_cpus: int | None = None  # processors, for agent domains when processors are shared
    max_cpus: int | None = None
    cpu_shares: int | None = None

    def to_xml(self) -> str:
        """The metadata element, as ``virDomainSetMetadata`` takes it (no namespace:
        libvirt adds it)."""
        element = ET.Element("settings", managed="yes" if self.managed else "no")
        for field in _FIELDS:
            value = getattr(self, field)
            if value is not None:
                element.set(field, str(value))
        return ET.tostring(element, encoding="unicode")


@dataclass(frozen=True)
class DomainFacts:
    """One domain as its XML describes it."""

    name: str
    memory_bytes: int  # <memory>: what the guest boots with, the balloon's ceiling
    vcpus: int  # <vcpu>: the most it may have online
    balloon_model: str | None  # <memballoon model=...>; None without the element
    stats_period_s: int | None  # <memballoon><stats period=...>
    agent_socket: str | None  # host end of the agent's channel, if it has one
    settings: DomainSettings
    #: The size of its virtio-mem device (part of <memory>), if it has exactly one.
    virtio_mem_bytes: int | None = None

    @property
    def balloon_usable(self) -> bool:
        return self.balloon_model in VIRTIO_BALLOONS


def parse_domain(xml: str) -> DomainFacts:
    """Read a domain's XML (``virDomainGetXMLDesc``)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ConfigError(f"domain XML does not parse: {exc}") from None
    name = (root.findtext("name") or "").strip()
    if not name:
        raise ConfigError("domain XML has no <name>")
    memory = root.find("memory")
    if memory is None:
        raise ConfigError("domain XML has no <memory>", where=name)
    balloon = root.find("devices/memballoon")
    stats = balloon.find("stats") if balloon is not None else None
    period = stats.get("period") if stats is not None else None
    vcpus = (root.findtext("vcpu") or "1").strip()
    return DomainFacts(
        name=name,
        memory_bytes=_size_bytes(memory, where=f"{name}: <memory>"),
        vcpus=_int(vcpus, f"{name}: <vcpu>"),
        balloon_model=balloon.get("model") if balloon is not None else None,
        stats_period_s=_int(period, f"{name}: <stats period>") if period is not None else None,
        agent_socket=_agent_socket(root),
        settings=_settings(root.find(f"metadata/{{{NAMESPACE_URI}}}settings"), name),
        virtio_mem_bytes=_virtio_mem_bytes(root, name),
    )


def virtio_mem_device(root: ET.Element) -> ET.Element | None:
    """A domain's virtio-mem device, if it has exactly one (with several, which to
    resize would be a guess)."""
    found = root.findall("devices/memory[@model='virtio-mem']")
    return found[0] if len(found) == 1 else None


def _virtio_mem_bytes(root: ET.Element, name: str) -> int | None:
    device = virtio_mem_device(root)
    size = device.find("target/size") if device is not None else None
    return None if size is None else _size_bytes(size, where=f"{name}: virtio-mem <size>")


def parse_settings(xml: str, name: str) -> DomainSettings:
    """Read the settings element alone (``virDomainGetMetadata`` gives it so)."""
    try:
        element = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ConfigError(f"balloonist metadata does not parse: {exc}", where=name) from None
    return _settings(element, name)


def _settings(element: ET.Element | None, name: str) -> DomainSettings:
    if element is None:
        return DomainSettings()
    managed = element.get("managed", "no")
    if managed not in ("yes", "no"):
        raise ConfigError(f"managed must be yes or no, not {managed!r}", where=f"{name}: metadata")
    values = {}
    for field in _FIELDS:
        raw = element.get(field, element.get(_FORMER.get(field, field)))
        values[field] = None if raw is None else _int(raw, f"{name}: metadata {field}")
    for field in ("shares", "min_cpus", "max_cpus", "cpu_shares"):
        if values[field] == 0:
            raise ConfigError("must be at least 1", where=f"{name}: metadata {field}")
    return DomainSettings(managed=managed == "yes", **values)


def _agent_socket(root: ET.Element) -> str | None:
    for channel in root.findall("devices/channel"):
        target = channel.find("target")
        source = channel.find("source")
        if (
            channel.get("type") == "unix"
            and target is not None
            and target.get("name") == AGENT_CHANNEL
            and source is not None
        ):
            return source.get("path")
    return None


def _size_bytes(element: ET.Element, where: str) -> int:
    unit = element.get("unit", "KiB").lower()
    if unit not in _UNIT_BYTES:
        raise ConfigError(f"unknown unit {element.get('unit')!r}", where=where)
    return _int((element.text or "").strip(), where) * _UNIT_BYTES[unit]


def _int(text: str, where: str) -> int:
    if not text.isdigit() or int(text) > _MAX_VALUE:
        raise ConfigError(f"{text!r} is not a whole number", where=where)
    return int(text)


__all__ = [
    "AGENT_CHANNEL",
    "METADATA_PREFIX",
    "NAMESPACE_URI",
    "DomainFacts",
    "DomainSettings",
    "parse_domain",
    "parse_settings",
]
