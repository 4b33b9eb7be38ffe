"""A domain's XML as balloonist reads it, and the settings it keeps in the metadata."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balloonist.errors import ConfigError
from balloonist.libvirt.domain_xml import (
    NAMESPACE_URI,
    DomainSettings,
    parse_domain,
    parse_settings,
)
from balloonist.units import GIB, MIB


def domain_xml(
    name: str = "web",
    memory: str = "<memory unit='KiB'>1048576</memory>",
    balloon: str = "<memballoon model='virtio'><stats period='5'/></memballoon>",
    metadata: str = "",
    channel: str = "",
) -> str:
    return (
        f"<domain type='kvm'><name>{name}</name>"
        f"<metadata>{metadata}</metadata>{memory}"
        f"<devices>{balloon}{channel}</devices></domain>"
    )


def test_a_plain_domain_is_read_with_no_settings() -> None:
    facts = parse_domain(domain_xml())
    assert facts.name == "web"
    assert facts.memory_bytes == GIB
    assert facts.balloon_model == "virtio" and facts.balloon_usable
    assert facts.stats_period_s == 5
    assert facts.agent_socket is None
    assert facts.settings == DomainSettings()


@pytest.mark.parametrize(
    ("memory", "expected"),
    [
        ("<memory>524288</memory>", 512 * MIB),  # libvirt's default unit is KiB
        ("<memory unit='MiB'>512</memory>", 512 * MIB),
        ("<memory unit='G'>2</memory>", 2 * GIB),
        ("<memory unit='bytes'>4096</memory>", 4096),
    ],
)
def test_memory_units(memory: str, expected: int) -> None:
    assert parse_domain(domain_xml(memory=memory)).memory_bytes == expected


@pytest.mark.parametrize(
    ("balloon", "model"),
    [("<memballoon model='none'/>", "none"), ("", None), ("<memballoon model='xen'/>", "xen")],
)
def test_a_domain_without_a_virtio_balloon_is_not_usable(balloon: str, model: str | None) -> None:
    facts = parse_domain(domain_xml(balloon=balloon))
    assert facts.balloon_model == model
    assert not facts.balloon_usable


def test_settings_round_trip_through_the_metadata() -> None:
    settings = DomainSettings(
        managed=True, min_bytes=256 * MIB, max_bytes=GIB, shares=2000, min_cpus=1, max_cpus=2
    )
    # libvirt stores the element under our namespace
    stored = settings.to_xml().replace(
        "<settings", f"<balloonist:settings xmlns:balloonist='{NAMESPACE_URI}'", 1
    )
    assert parse_domain(domain_xml(metadata=stored)).settings == settings
    assert parse_settings(settings.to_xml(), "web") == settings


def test_metadata_with_the_former_cpu_names_is_read() -> None:
    old = '<settings managed="yes" cpu_min="2" cpu_max="3" />'
    assert parse_settings(old, "web") == DomainSettings(managed=True, min_cpus=2, max_cpus=3)
    bad = '<settings managed="yes" cpu_min="0" />'
    with pytest.raises(ConfigError, match="min_cpus"):
        parse_settings(bad, "web")


@given(
    st.booleans(),
    st.none() | st.integers(0, 2**62),
    st.none() | st.integers(0, 2**62),
    st.none() | st.integers(1, 2**62),
)
def test_any_settings_round_trip(
    managed: bool, low: int | None, high: int | None, shares: int | None
) -> None:
    settings = DomainSettings(managed, low, high, shares)
    assert parse_settings(settings.to_xml(), "web") == settings


def test_an_element_in_another_namespace_is_not_ours() -> None:
    theirs = "<x:settings xmlns:x='urn:someone:else' managed='yes'/>"
    assert parse_domain(domain_xml(metadata=theirs)).settings == DomainSettings()


def test_the_agent_channel_is_found() -> None:
    channel = (
        "<channel type='unix'><source mode='bind' path='/run/a.sock'/>"
        "<target type='virtio' name='org.balloonist.agent.0'/></channel>"
    )
    assert parse_domain(domain_xml(channel=channel)).agent_socket == "/run/a.sock"


@pytest.mark.parametrize(
    ("metadata", "where", "what"),
    [
        ("managed='maybe'", "web: metadata", "yes or no"),
        ("min_bytes='12MiB'", "web: metadata min_bytes", "whole number"),
        ("max_bytes='-1'", "web: metadata max_bytes", "whole number"),
        (f"min_bytes='{2**70}'", "web: metadata min_bytes", "whole number"),
        ("shares='0'", "web: metadata shares", "at least 1"),
        ("max_cpus='0'", "web: metadata max_cpus", "at least 1"),
    ],
)
def test_bad_settings_name_the_domain_and_the_attribute(
    metadata: str, where: str, what: str
) -> None:
    element = f"<b:settings xmlns:b='{NAMESPACE_URI}' {metadata}/>"
    with pytest.raises(ConfigError) as caught:
        parse_domain(domain_xml(metadata=element))
    assert caught.value.where == where
    assert what in caught.value.message


@pytest.mark.parametrize(
    "xml",
    [
        "<domain",
        "<domain><memory>1</memory></domain>",
        "<domain><name>x</name></domain>",
        domain_xml(memory="<memory unit='furlongs'>3</memory>"),
        domain_xml(balloon="<memballoon model='virtio'><stats period='often'/></memballoon>"),
    ],
)
def test_bad_domain_xml_is_a_config_error(xml: str) -> None:
    with pytest.raises(ConfigError):
        parse_domain(xml)


VMEM = (
    "<memory model='virtio-mem'><target><size unit='MiB'>512</size><node>0</node>"
    "<requested unit='KiB'>0</requested></target></memory>"
)


def test_a_virtio_mem_device_is_found_only_when_there_is_one() -> None:
    balloon = "<memballoon model='virtio'/>"
    one = parse_domain(domain_xml(balloon=balloon + VMEM))
    assert one.virtio_mem_bytes == 512 * MIB
    assert parse_domain(domain_xml(balloon=balloon)).virtio_mem_bytes is None
    # Two: which to resize would be a guess, so neither is.
    assert parse_domain(domain_xml(balloon=balloon + VMEM + VMEM)).virtio_mem_bytes is None
    dimm = "<memory model='dimm'><target><size unit='MiB'>512</size></target></memory>"
    assert parse_domain(domain_xml(balloon=balloon + dimm)).virtio_mem_bytes is None
