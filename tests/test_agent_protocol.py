"""The agent wire protocol: what is sent decodes to itself, and anything a hostile guest
can put on a line is refused with ProtocolError, never another exception (fuzzed)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balloonist.agent import protocol as wire
from balloonist.driver import UnitRange
from balloonist.errors import GuestProtocolError

seqs = st.integers(0, wire.MAX_SEQ)
pages = st.integers(0, wire.MAX_PFN)
counters = st.integers(0, 1 << 62)
percent = st.one_of(st.just(-1.0), st.floats(0.0, 100.0))
text = st.text(
    st.characters(codec="utf-8", categories=["L", "N", "P"], include_characters=" "), max_size=50
)


@st.composite
def disjoint_ranges(draw: st.DrawFn) -> tuple[UnitRange, ...]:
    starts = draw(st.lists(st.integers(0, 1 << 30), min_size=1, max_size=20, unique=True))
    starts.sort()
    out = []
    for i, start in enumerate(starts):
        room = (starts[i + 1] if i + 1 < len(starts) else start + 1000) - start
        out.append(UnitRange(start, draw(st.integers(1, room))))
    return tuple(draw(st.permutations(out)))


@st.composite
def vcpu_split(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Disjoint, sorted (online, reserved), at least one online."""
    cpus = draw(st.lists(st.integers(0, wire.MAX_VCPUS - 1), min_size=1, max_size=64, unique=True))
    reserved = draw(st.sets(st.sampled_from(cpus), max_size=len(cpus) - 1))
    return tuple(sorted(set(cpus) - reserved)), tuple(sorted(reserved))


guest_messages = st.one_of(
    st.builds(
        wire.Hello,
        seq=seqs,
        version=st.sampled_from(wire.VERSIONS),
        agent=text,
        page_size=st.just(4096),
        token=st.text("0123456789abcdef", min_size=16, max_size=16),
    ),
    st.builds(wire.Locked, seq=seqs, ranges=disjoint_ranges()),
    st.builds(wire.Unlocked, seq=seqs, ranges=disjoint_ranges()),
    st.builds(
        wire.Stats,
        seq=seqs,
        balloon_pages=pages,
        rate_pages=pages,
        mem_total_bytes=st.integers(0, 1 << 50),
        mem_available_bytes=st.integers(0, 1 << 50),
        psi_some_avg10=percent,
        psi_full_avg10=percent,
        refaults=counters,
        swap_in_pages=counters,
        swap_out_pages=counters,
        psi_some_total_us=st.integers(-1, wire.MAX_COUNTER),
        swap_used_bytes=st.integers(0, 1 << 50),
    ),
    st.builds(wire.Error, seq=seqs, code=st.sampled_from(sorted(wire.ERROR_CODES)), message=text),
    st.builds(lambda seq, split: wire.Cpus(seq, *split), seq=seqs, split=vcpu_split()),
)
host_messages = st.one_of(
    st.builds(wire.Welcome, seq=seqs, version=st.sampled_from(wire.VERSIONS)),
    st.builds(wire.Target, seq=seqs, balloon_pages=pages),
    st.builds(wire.Ack, seq=seqs, freed_pages=pages),
    st.builds(wire.CpuTarget, seq=seqs, reserved_vcpus=st.integers(0, wire.MAX_VCPUS - 1)),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=30,
)


@given(guest_messages)
def test_guest_messages_round_trip(message: wire.GuestMessage) -> None:
    line = wire.encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert wire.decode_guest_message(line) == message


@given(guest_messages)
def test_a_version_1_session_leaves_the_version_2_fields_out(message: wire.GuestMessage) -> None:
    line = wire.encode(message, 1)
    decoded = wire.decode_guest_message(line, 1)
    if isinstance(message, wire.Stats):
        assert decoded == dataclasses.replace(message, psi_some_total_us=None, swap_used_bytes=None)
        with pytest.raises(wire.ProtocolError, match="missing psi_some_total_us"):
            wire.decode_guest_message(line, 2)
    else:
        assert decoded == message


@given(host_messages)
def test_host_messages_round_trip(message: wire.HostMessage) -> None:
    assert wire.decode_host_message(wire.encode(message)) == message


@settings(max_examples=500)
@given(st.binary(max_size=2000))
def test_any_bytes_decode_or_raise_a_protocol_error(line: bytes) -> None:
    with contextlib.suppress(wire.ProtocolError):
        wire.decode_guest_message(line)


@settings(max_examples=500)
@given(
    json_values,
    st.sampled_from(["hello", "locked", "unlocked", "stats", "error", "ack", "cpus", "cpu_target"]),
)
def test_any_json_object_decodes_or_raises_a_protocol_error(value: Any, kind: str) -> None:
    for candidate in (
        value,
        {"type": kind, "seq": 1, "ranges": value},
        {"type": kind, "seq": 1, "online": value, "reserved": []},
        {"type": kind, "seq": 1, "online": [0], "reserved": value},
        {"type": kind, "seq": 1, "reserved_vcpus": value},
        {"type": kind, **_d(value)},
    ):
        try:
            line = json.dumps(candidate).encode()
        except ValueError:
            continue
        with contextlib.suppress(wire.ProtocolError):
            wire.decode_guest_message(line)
        with contextlib.suppress(wire.ProtocolError):
            wire.decode_host_message(line)


def _d(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {"value": value}


@given(guest_messages, st.data())
def test_a_valid_message_with_a_field_dropped_added_or_retyped_is_refused(
    message: wire.GuestMessage, data: st.DataObject
) -> None:
    fields = json.loads(wire.encode(message))
    name = data.draw(st.sampled_from(sorted(set(fields) - {"type"})))
    broken = [
        {k: v for k, v in fields.items() if k != name},
        {**fields, "extra": 1},
        {**fields, name: "x" if not isinstance(fields[name], str) else 1},
        {**fields, name: True},
    ]
    for candidate in broken:
        with pytest.raises(wire.ProtocolError):
            wire.decode_guest_message(json.dumps(candidate).encode())


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b'{"type":"locked","seq":1,"ranges":[[5,3],[6,1]]}', "overlap"),
        (b'{"type":"locked","seq":1,"ranges":[]}', "ranges"),
        (b'{"type":"locked","seq":1,"ranges":[[5,0]]}', "outside"),
        (b'{"type":"locked","seq":1,"ranges":[[-1,1]]}', "outside"),
        (b'{"type":"locked","seq":1,"ranges":[[1099511627775,2]]}', "past"),
        (b'{"type":"stats","seq":1,"psi_some_avg10":NaN}', "not a number"),
        (b'{"type":"error","seq":1,"code":"pressure","message":"a","message":"b"}', "twice"),
        (b'{"type":"error","seq":1,"code":"reboot","message":"a"}', "unknown error code"),
        (b'{"type":"welcome","seq":1,"version":1}', "unknown message type"),
        (b'{"type":"cpu_target","seq":1,"reserved_vcpus":1}', "unknown message type"),
        (b'{"type":"cpus","seq":1,"online":[0,1],"reserved":[1]}', "both online and reserved"),
        (b'{"type":"cpus","seq":1,"online":[1,0],"reserved":[]}', "strictly increasing"),
        (b'{"type":"cpus","seq":1,"online":[0,0],"reserved":[]}', "strictly increasing"),
        (b'{"type":"cpus","seq":1,"online":[],"reserved":[0]}', "0 vCPUs, must be 1"),
        (b'{"type":"cpus","seq":1,"online":[1024],"reserved":[]}', "outside"),
        (b'{"type":"cpus","seq":1,"online":[true],"reserved":[]}', "expected an integer"),
        (b'{"type":"cpus","seq":1,"online":[0],"reserved":7}', "expected a list"),
        (b'{"type":"cpus","seq":1,"online":[0]}', "missing reserved"),
        (b'{"type":"error","seq":1,"code":"cpu-reboot","message":"a"}', "unknown error code"),
        (b"[" * 10000, "nested too deeply"),
        (b'{"type":"hello"}' + b" " * wire.MAX_LINE_BYTES, "limit"),
        (b"\xff\xfe", "not a JSON line"),
    ],
)
def test_hostile_lines_are_refused_with_the_reason(line: bytes, why: str) -> None:
    with pytest.raises(GuestProtocolError, match=why):
        wire.decode_guest_message(line)


def test_a_big_report_is_split_into_messages_within_bounds() -> None:
    ranges = [UnitRange(2 * i, 1) for i in range(wire.MAX_RANGES_PER_MESSAGE * 2 + 1)]
    chunks = wire.split_ranges(ranges)
    assert [len(c) for c in chunks] == [wire.MAX_RANGES_PER_MESSAGE] * 2 + [1]
    for chunk in chunks:
        assert len(wire.encode(wire.Locked(1, chunk))) <= wire.MAX_LINE_BYTES


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b'{"type":"cpu_target","seq":1,"reserved_vcpus":-1}', "outside"),
        (b'{"type":"cpu_target","seq":1,"reserved_vcpus":1024}', "outside"),
        (b'{"type":"cpu_target","seq":1,"reserved_vcpus":1.0}', "expected an integer"),
        (b'{"type":"cpu_target","seq":1}', "missing reserved_vcpus"),
        (b'{"type":"cpus","seq":1,"online":[0],"reserved":[]}', "unknown message type"),
    ],
)
def test_hostile_host_lines_are_refused_with_the_reason(line: bytes, why: str) -> None:
    with pytest.raises(GuestProtocolError, match=why):
        wire.decode_host_message(line)


def test_a_report_of_every_vcpu_fits_a_line_and_one_more_is_refused() -> None:
    every = wire.Cpus(wire.MAX_SEQ, tuple(range(1, wire.MAX_VCPUS)), (0,))
    assert len(wire.encode(every)) <= wire.MAX_LINE_BYTES
    assert wire.decode_guest_message(wire.encode(every)) == every
    too_many = json.dumps(
        {"type": "cpus", "seq": 1, "online": list(range(wire.MAX_VCPUS + 1)), "reserved": []}
    )
    with pytest.raises(wire.ProtocolError, match="must be 1 to"):
        wire.decode_guest_message(too_many.encode())


def test_the_agent_cannot_send_a_cpu_report_the_protocol_refuses() -> None:
    with pytest.raises(wire.ProtocolError, match="both online and reserved"):
        wire.encode(wire.Cpus(1, (0, 1), (1,)))
