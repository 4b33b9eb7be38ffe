"""Reading and writing a domain's balloonist settings in its XML metadata.

A change is written to the running domain and to its persistent definition (when it
has one), so it takes effect now and survives a restart of the domain, of libvirtd
and of the daemon; ``virsh dumpxml`` shows it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from balloonist.libvirt.connection import Libvirt
from balloonist.libvirt.domain_xml import (
    METADATA_PREFIX,
    NAMESPACE_URI,
    DomainSettings,
    parse_settings,
)


def read_settings(libvirt: Libvirt, name: str) -> DomainSettings:
    """The domain's settings as defined (its persistent XML, else the running one)."""
    lib = libvirt.lib

    def read(dom: Any) -> DomainSettings:
        return _settings_of(lib, dom, name)

    return libvirt.domain_call(name, read)


def write_settings(
    libvirt: Libvirt, name: str, update: Callable[[DomainSettings], DomainSettings]
) -> DomainSettings:
    """Replace the domain's settings with ``update(current)``; returns what was written."""
    lib = libvirt.lib

    def write(dom: Any) -> DomainSettings:
        settings = update(_settings_of(lib, dom, name))
        flags = (lib.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0) | (
            lib.VIR_DOMAIN_AFFECT_CONFIG if dom.isPersistent() else 0
        )
        element = lib.VIR_DOMAIN_METADATA_ELEMENT
        dom.setMetadata(element, settings.to_xml(), METADATA_PREFIX, NAMESPACE_URI, flags)
        return settings

    return libvirt.domain_call(name, write)


def _settings_of(lib: Any, dom: Any, name: str) -> DomainSettings:
    flags = lib.VIR_DOMAIN_AFFECT_CONFIG if dom.isPersistent() else lib.VIR_DOMAIN_AFFECT_LIVE
    try:
        xml = dom.metadata(lib.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE_URI, flags)
    except lib.libvirtError as exc:
        if exc.get_error_code() == lib.VIR_ERR_NO_DOMAIN_METADATA:
            return DomainSettings()
        raise
    return parse_settings(xml, name)


__all__ = ["read_settings", "write_settings"]
