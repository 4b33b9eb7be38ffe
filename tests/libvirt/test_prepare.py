"""``balloonist libvirt prepare``: the XML changes a domain needs, worked out from its XML."""

from __future__ import annotations

import pytest

from balloonist.errors import ConfigError
from balloonist.libvirt.domain_xml import parse_domain
from balloonist.libvirt.prepare import prepare

PLAIN = (
    "<domain type='kvm'><name>web</name><memory unit='KiB'>1048576</memory>"
    "<currentMemory unit='KiB'>1048576</currentMemory><vcpu>2</vcpu>"
    "<devices><disk type='file'/></devices></domain>"
)


def test_a_plain_domain_gets_a_balloon_that_deflates_reports_free_pages_and_stats() -> None:
    prepared = prepare(PLAIN, agent=False)
    facts = parse_domain(prepared.xml)
    assert facts.balloon_model == "virtio" and facts.stats_period_s == 1
    assert "autodeflate='on'" in prepared.xml.replace('"', "'")
    assert "freePageReporting='on'" in prepared.xml.replace('"', "'")
    assert "memoryBacking" not in prepared.xml and facts.agent_socket is None
    assert len(prepared.changes) == 4


def test_the_agent_gets_its_channel_and_shared_file_backed_memory() -> None:
    prepared = prepare(PLAIN, agent=True)
    xml = prepared.xml.replace('"', "'")
    assert (
        "<channel type='unix'><source mode='bind' />"
        "<target type='virtio' name='org.balloonist.agent.0' /></channel>"
    ) in xml
    assert "<memoryBacking><source type='file' /><access mode='shared' /></memoryBacking>" in xml
    # libvirt's order: memoryBacking right after the memory elements
    assert xml.index("currentMemory") < xml.index("memoryBacking") < xml.index("<vcpu")


def test_prepared_xml_needs_nothing_more_and_keeps_what_was_there() -> None:
    once = prepare(PLAIN, agent=True)
    twice = prepare(once.xml, agent=True)
    assert twice.changes == ()
    assert "<disk type=" in twice.xml


def test_our_metadata_keeps_its_prefix() -> None:
    with_meta = PLAIN.replace(
        "<vcpu>",
        "<metadata><balloonist:settings xmlns:balloonist='urn:balloonist:domain:1' "
        "managed='yes'/></metadata><vcpu>",
    )
    prepared = prepare(with_meta, agent=False)
    assert "<balloonist:settings" in prepared.xml
    assert parse_domain(prepared.xml).settings.managed


def test_a_domain_whose_balloon_is_turned_off_is_not_changed_behind_its_owners_back() -> None:
    off = PLAIN.replace("<disk type='file'/>", "<memballoon model='none'/>")
    with pytest.raises(ConfigError, match="memballoon model='none'"):
        prepare(off, agent=False)
