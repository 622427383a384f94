"""protos.lite against protobuf itself: every message of the schema, random values, both ways.

The servers speak protobuf (grpcio); the sidecar decodes with protos.lite. These tests build
random messages of every type protoc compiled, serialize them with protobuf and check that
protos.lite reads the same values (and the other way round), then feed both parsers mutated
and truncated bytes and check they accept and refuse the same inputs, with equal results.
"""

from __future__ import annotations

import math
import struct
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import DecodeError as PbDecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import destination_pb2, identity_pb2, lite, policy_pb2
from protos.lite_schema import ENUMS, MESSAGES

MODULES = (destination_pb2, identity_pb2, policy_pb2, duration_pb2, timestamp_pb2)


def descriptor_of(full_name: str) -> Any:
    for module in MODULES:
        pool = module.DESCRIPTOR.pool
        try:
            return pool.FindMessageTypeByName(full_name)
        except KeyError:
            continue
    raise KeyError(full_name)


def pb_class(full_name: str) -> Any:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor_of(full_name))


# --- random values from the schema -------------------------------------------------------------

_INTS = {
    "int32": (-(2**31), 2**31 - 1), "sint32": (-(2**31), 2**31 - 1), "sfixed32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1), "sint64": (-(2**63), 2**63 - 1), "sfixed64": (-(2**63), 2**63 - 1),
    "uint32": (0, 2**32 - 1), "fixed32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1), "fixed64": (0, 2**64 - 1),
    "enum": (-5, 12),
}  # fmt: skip


def scalar(kind: str) -> st.SearchStrategy[Any]:
    if kind in _INTS:
        lo, hi = _INTS[kind]
        return st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi, 0, 1]))
    if kind == "string":
        return st.text(max_size=12)
    if kind == "bytes":
        return st.binary(max_size=12)
    if kind == "bool":
        return st.booleans()
    if kind == "float":
        return st.floats(width=32, allow_nan=False)
    if kind == "double":
        return st.floats(allow_nan=False)
    raise AssertionError(kind)


@st.composite
def values_of(draw: st.DrawFn, name: str, depth: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    oneofs_used: set[str] = set()
    for fname, _n, kind, label, oneof, target in MESSAGES[name]:
        if not draw(st.booleans()) or (oneof is not None and oneof in oneofs_used):
            continue
        if kind == "message" and depth >= 4 and label != 3:
            continue
        if oneof is not None:
            oneofs_used.add(oneof)
        if label == 3:
            entry = dict((f[0], f) for f in MESSAGES[target])
            assert entry["value"][2] != "message", "map values of message type are not generated"
            keys = scalar(entry["key"][2])
            out[fname] = draw(st.dictionaries(keys, scalar(entry["value"][2]), max_size=3))
        elif kind == "message":
            one = values_of(target, depth + 1)
            out[fname] = draw(st.lists(one, max_size=3)) if label == 2 else draw(one)
        else:
            out[fname] = (
                draw(st.lists(scalar(kind), max_size=3)) if label == 2 else draw(scalar(kind))
            )
    return out


def build_pb(name: str, values: dict[str, Any]) -> Any:
    msg = pb_class(name)()
    fill(msg, name, values)
    return msg


def fill(msg: Any, name: str, values: dict[str, Any]) -> None:
    fields = {f[0]: f for f in MESSAGES[name]}
    for fname, value in values.items():
        _, _, kind, label, _, target = fields[fname]
        if label == 3:
            getattr(msg, fname).update(value)
        elif kind == "message" and label == 2:
            for item in value:
                fill(getattr(msg, fname).add(), target, item)
        elif kind == "message":
            getattr(msg, fname).SetInParent()
            fill(getattr(msg, fname), target, value)
        elif label == 2:
            getattr(msg, fname).extend(value)
        else:
            setattr(msg, fname, value)


def assert_same(name: str, pb: Any, mine: lite.Message) -> None:
    """Every field of ``pb`` (protobuf) reads the same in ``mine`` (protos.lite)."""
    for fname, _n, kind, label, oneof, target in MESSAGES[name]:
        where = f"{name}.{fname}"
        if label == 1:
            assert pb.HasField(fname) == mine.HasField(fname), where
        if oneof is not None:
            assert pb.WhichOneof(oneof) == mine.WhichOneof(oneof), where
        a, b = getattr(pb, fname), getattr(mine, fname)
        if label == 3:
            assert dict(a) == dict(b), where
        elif kind == "message" and label == 2:
            assert len(a) == len(b), where
            for x, y in zip(a, b, strict=True):
                assert_same(target, x, y)
        elif kind == "message":
            assert_same(target, a, b)
        elif label == 2:
            assert [same_scalar(x, y) for x, y in zip(a, b, strict=True)] == [True] * len(a), where
            assert len(a) == len(b), where
        else:
            assert same_scalar(a, b), (where, a, b)


def same_scalar(a: Any, b: Any) -> bool:
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or struct.pack("<d", a) == struct.pack("<d", b)
    return type(a) is type(b) and a == b


NAMES = st.sampled_from(sorted(MESSAGES))


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    name = draw(NAMES)
    return name, draw(values_of(name))


# --- the properties ----------------------------------------------------------------------------


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_what_protobuf_writes_lite_reads(case: tuple[str, dict[str, Any]]) -> None:
    name, values = case
    pb = build_pb(name, values)
    assert_same(name, pb, lite.decode(name, pb.SerializeToString()))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_what_lite_writes_protobuf_reads(case: tuple[str, dict[str, Any]]) -> None:
    name, values = case
    assert pb_class(name).FromString(lite.encode(name, values)) == build_pb(name, values)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages(), st.data())
def test_damaged_bytes_are_refused_or_read_as_protobuf_reads_them(
    case: tuple[str, dict[str, Any]], data: st.DataObject
) -> None:
    name, values = case
    raw = bytearray(build_pb(name, values).SerializeToString())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, len(raw)))
        if op == "flip" and at < len(raw):
            raw[at] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del raw[at:]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=4))
    try:
        theirs = pb_class(name).FromString(bytes(raw))
    except PbDecodeError:
        theirs = None
    try:
        mine = lite.decode(name, bytes(raw))
    except lite.DecodeError:
        mine = None
    if mine is not None:
        assert theirs is not None, ("protos.lite accepted what protobuf refuses", name, raw)
        assert_same(name, theirs, mine)
    elif MESSAGES[name]:  # upb accepts some field-number-0 input for a message without fields
        assert theirs is None, ("protos.lite refused what protobuf accepts", name, raw)


@given(st.binary(max_size=64), NAMES)
def test_random_bytes_never_raise_anything_but_decode_error(raw: bytes, name: str) -> None:
    try:
        lite.decode(name, raw)
    except lite.DecodeError:
        pass


# --- the cases that matter to the sidecar, spelled out -------------------------------------------

UPDATE = "io.linkerd.proxy.destination.Update"
CERTIFY_RESPONSE = "io.linkerd.proxy.identity.CertifyResponse"


def test_absent_fields_read_as_proto3_defaults() -> None:
    msg = lite.decode("io.linkerd.proxy.destination.WeightedAddr", b"")
    assert (msg.weight, msg.metric_labels, msg.addr.port) == (0, {}, 0)
    assert not msg.HasField("tls_identity") and msg.tls_identity.WhichOneof("strategy") is None
    with pytest.raises(ValueError, match="not a field with presence"):
        msg.HasField("weight")
    with pytest.raises(AttributeError, match="no field 'wieght'"):
        _ = msg.wieght
    with pytest.raises(ValueError, match="no oneof"):
        msg.WhichOneof("nope")


def test_the_last_oneof_member_on_the_wire_wins() -> None:
    add = destination_pb2.Update(add=destination_pb2.WeightedAddrSet()).SerializeToString()
    gone = destination_pb2.Update(no_endpoints=destination_pb2.NoEndpoints(exists=True))
    msg = lite.decode(UPDATE, add + gone.SerializeToString())
    assert msg.WhichOneof("update") == "no_endpoints" and not msg.HasField("add")
    assert msg.no_endpoints.exists is True


def test_a_message_field_sent_twice_is_merged() -> None:
    part1 = destination_pb2.WeightedAddr(weight=7, addr=destination_pb2.TcpAddress(port=80))
    part2 = destination_pb2.WeightedAddr(addr=destination_pb2.TcpAddress(ip={"ipv4": 1}))
    msg = lite.decode(
        "io.linkerd.proxy.destination.WeightedAddr",
        part1.SerializeToString() + part2.SerializeToString(),
    )
    assert (msg.weight, msg.addr.port, msg.addr.ip.ipv4) == (7, 80, 1)


def test_unknown_fields_are_skipped() -> None:
    varint_127 = bytes([0xF8, 0x07, 0x01])
    bytes_127 = bytes([0xFA, 0x07, 0x02, 0x61, 0x62])
    group_127 = bytes([0xFB, 0x07, 0x08, 0x01, 0xFC, 0x07])
    status_range = policy_pb2.StatusRange(start=500, end=599).SerializeToString()
    msg = lite.decode(
        "trustmesh.policy.v1.StatusRange", varint_127 + bytes_127 + group_127 + status_range
    )
    assert (msg.start, msg.end) == (500, 599)
    # A known number with another wire type is an unknown field too, as protobuf reads it.
    assert lite.decode("trustmesh.policy.v1.StatusRange", b"\x0d\x01\x02\x03\x04").start == 0


def test_a_map_entry_with_unknown_fields_is_left_out_as_upb_does() -> None:
    # metric_labels {key: varint 0 (a string field sent with another wire type), value: ""}
    raw = b"\x12\x04\x08\x00\x12\x00" + b"\x12\x06\x0a\x01k\x12\x01v"
    name = "io.linkerd.proxy.destination.WeightedAddrSet"
    assert dict(destination_pb2.WeightedAddrSet.FromString(raw).metric_labels) == {"k": "v"}
    assert lite.decode(name, raw).metric_labels == {"k": "v"}


def test_repeated_numbers_are_read_packed_or_not(monkeypatch: pytest.MonkeyPatch) -> None:
    # No message here has a repeated number; a synthetic one checks the path stays right.
    packed = lite.MessageType("test.Packed", (("values", 1, "sint32", lite.REPEATED, None, None),))
    monkeypatch.setitem(lite._TYPES, "test.Packed", packed)
    raw = b"\x0a\x04\x02\x03\xac\x02" + b"\x08\x01"  # packed [1, -2, 150], then -1 alone
    assert lite.decode("test.Packed", raw).values == [1, -2, 150, -1]
    assert (
        lite.encode("test.Packed", values=[1, -2, 150, -1])
        == b"\x08\x02\x08\x03\x08\xac\x02\x08\x01"
    )
    with pytest.raises(lite.DecodeError, match="truncated varint"):
        lite.decode("test.Packed", b"\x0a\x02\x02\xac")


def test_the_certify_answer_reads_as_the_client_uses_it() -> None:
    expiry = datetime(2026, 11, 23, 7, 0, 1, 500_000, tzinfo=UTC)
    valid_until = timestamp_pb2.Timestamp()
    valid_until.FromDatetime(expiry)
    pb = identity_pb2.CertifyResponse(
        leaf_certificate=b"leaf", intermediate_certificates=[b"i1", b"i2"], valid_until=valid_until
    )
    msg = lite.decode(CERTIFY_RESPONSE, pb.SerializeToString())
    assert msg.leaf_certificate == b"leaf" and msg.intermediate_certificates == [b"i1", b"i2"]
    assert msg.valid_until.ToDatetime(tzinfo=UTC) == expiry
    assert msg.valid_until.ToDatetime() == expiry.replace(tzinfo=None)
    with pytest.raises(TypeError, match=r"not a google\.protobuf\.Duration"):
        msg.valid_until.ToTimedelta()


def test_durations_round_toward_zero_as_protobuf_does() -> None:
    for td in (timedelta(seconds=3, microseconds=7), timedelta(seconds=-3, microseconds=-7)):
        d = duration_pb2.Duration()
        d.FromTimedelta(td)
        d.nanos += 999 if td > timedelta(0) else -999
        mine = lite.decode("google.protobuf.Duration", d.SerializeToString())
        assert mine.ToTimedelta() == d.ToTimedelta() == td


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x08", "truncated varint"),
        (b"\x08" + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
        (b"\x0a\x05ab", "runs past the end"),
        (b"\x00\x01", "field number 0 out of range"),
        (b"\x80\x80\x80\x80\x10", "field number 536870912 out of range"),
        (b"\x0f", "unexpected wire type 7"),
        (b"\x0c", "end of group without its start"),
        (b"\x1b\x08\x01\x24", "end of group with another field number"),
        (b"\x09\x01\x02", "truncated fixed-width"),
    ],
)
def test_malformed_input_is_refused_with_what_is_wrong(raw: bytes, message: str) -> None:
    with pytest.raises(lite.DecodeError, match=message):
        lite.decode(CERTIFY_RESPONSE, raw)


def test_strings_must_be_utf8() -> None:
    with pytest.raises(lite.DecodeError, match="path is not valid UTF-8"):
        lite.decode("io.linkerd.proxy.destination.GetDestination", b"\x12\x02\xc3\x28")


def test_nesting_is_bounded() -> None:
    # TcpAddress{ip: IPAddress{...}} cannot nest forever, but a skipped group can: refused.
    deep = b"\xfb\x07" * (lite.MAX_DEPTH + 2)
    with pytest.raises(lite.DecodeError, match="nested too deeply"):
        lite.decode(UPDATE, deep)


def test_encoding_refuses_an_unknown_field_name_and_a_value_of_the_wrong_type() -> None:
    with pytest.raises(KeyError, match="no field 'pth'"):
        lite.encode("io.linkerd.proxy.destination.GetDestination", pth="x")
    with pytest.raises(TypeError, match=r"field path \(string\) cannot hold bytes"):
        lite.encode("io.linkerd.proxy.destination.GetDestination", path=b"x")
    with pytest.raises(TypeError, match=r"field port \(uint32\) cannot hold bool"):
        lite.encode("trustmesh.policy.v1.PortSpec", port=True)
    with pytest.raises(TypeError, match=r"field port \(uint32\) cannot hold str"):
        lite.encode("trustmesh.policy.v1.PortSpec", port="80")


def test_enum_values_come_from_the_proto() -> None:
    assert lite.enum_value("trustmesh.policy.v1.Protocol", "GRPC") == policy_pb2.GRPC
    assert set(ENUMS["trustmesh.policy.v1.Protocol"]) == set(policy_pb2.Protocol.keys())


def test_the_schema_covers_every_message_protoc_compiled() -> None:
    compiled = set()
    for module in (destination_pb2, identity_pb2, policy_pb2):
        pending = list(module.DESCRIPTOR.message_types_by_name.values())
        while pending:
            d = pending.pop()
            compiled.add(d.full_name)
            pending.extend(d.nested_types)
    assert compiled <= set(MESSAGES)
