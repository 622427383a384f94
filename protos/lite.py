"""A small proto3 codec for the messages the sidecar exchanges with the control plane.

The sidecar (``trustmesh proxy run``) decodes Certify answers, destination updates and policies,
and encodes a handful of requests. protobuf's runtime and generated modules cost each sidecar
2.5 MiB of resident memory for that, more than any other control-plane part; this module does the
same job in plain Python, from a schema that ``python -m protos.build`` generates out of the very
descriptors protoc compiled (``protos/lite_schema.py``), so the two cannot disagree about a
field. The servers keep protobuf; the tests check both sides against it.

Decoded messages read like protobuf's: ``msg.field`` (with proto3 defaults for what was not
sent, an empty message for an absent message field), ``HasField`` for fields with presence,
``WhichOneof``, and ``ToTimedelta``/``ToDatetime`` on ``google.protobuf.Duration``/``Timestamp``.
Parsing follows protobuf's rules: unknown fields (and known numbers with another wire type) are
skipped, repeated scalars are read packed or not, a message field sent twice is merged, the last
member of a oneof wins, strings must be UTF-8. Anything malformed raises :class:`DecodeError`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from protos.lite_schema import ENUMS, MESSAGES

# Field labels in the schema.
IMPLICIT, PRESENT, REPEATED, MAP = 0, 1, 2, 3

_VARINT_KINDS = frozenset(
    ("bool", "enum", "int32", "int64", "uint32", "uint64", "sint32", "sint64")
)
_FIXED32 = {"fixed32": "<I", "sfixed32": "<i", "float": "<f"}
_FIXED64 = {"fixed64": "<Q", "sfixed64": "<q", "double": "<d"}
_DEFAULTS: dict[str, Any] = {"string": "", "bytes": b"", "bool": False, "float": 0.0, "double": 0.0}
# What encode takes for each kind (anything else for a number is int).
_PYTHON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "bytes": (bytes, bytearray, memoryview), "bool": (bool,),
    "float": (float, int), "double": (float, int),
}  # fmt: skip
MAX_DEPTH = 100  # protobuf's default recursion limit
MAX_FIELD_NUMBER = 2**29 - 1

DURATION = "google.protobuf.Duration"
TIMESTAMP = "google.protobuf.Timestamp"


class DecodeError(ValueError):
    """The bytes are not a valid encoding of the expected message."""


class Field:
    """One field of a message type: name, number, kind, label, oneof and wire type."""

    __slots__ = ("kind", "label", "name", "number", "oneof", "type", "wire")

    def __init__(
        self, name: str, number: int, kind: str, label: int, oneof: str | None, type_: str | None
    ) -> None:
        self.name, self.number, self.kind, self.label = name, number, kind, label
        self.oneof, self.type = oneof, type_
        if kind in _VARINT_KINDS:
            self.wire = 0
        elif kind in _FIXED64:
            self.wire = 1
        elif kind in _FIXED32:
            self.wire = 5
        else:
            self.wire = 2


class MessageType:
    """One message's fields, by name and by number."""

    __slots__ = ("by_name", "by_number", "name", "oneofs")

    def __init__(self, name: str, fields: tuple[tuple[Any, ...], ...]) -> None:
        self.name = name
        self.by_name = {f[0]: Field(*f) for f in fields}
        self.by_number = {f.number: f for f in self.by_name.values()}
        self.oneofs: dict[str, tuple[str, ...]] = {}
        for f in self.by_name.values():
            if f.oneof is not None:
                self.oneofs[f.oneof] = (*self.oneofs.get(f.oneof, ()), f.name)


_TYPES: dict[str, MessageType] = {}


def message_type(name: str) -> MessageType:
    """The schema of message ``name`` (its full protobuf name); KeyError if there is none."""
    t = _TYPES.get(name)
    if t is None:
        t = _TYPES[name] = MessageType(name, MESSAGES[name])
    return t


def enum_value(enum: str, name: str) -> int:
    """The number of value ``name`` of enum ``enum`` (full protobuf names)."""
    return ENUMS[enum][name]


class Message:
    """A decoded message: fields as attributes, protobuf's presence methods."""

    __slots__ = ("_type", "_values")

    def __init__(self, type_: MessageType, values: dict[str, Any] | None = None) -> None:
        self._type = type_
        self._values: dict[str, Any] = {} if values is None else values

    def __getattr__(self, name: str) -> Any:
        f = self._type.by_name.get(name)
        if f is None:
            raise AttributeError(f"{self._type.name} has no field {name!r}")
        value = self._values.get(name)
        if value is not None:
            return value
        if f.label == REPEATED:
            return []
        if f.label == MAP:
            return {}
        if f.kind == "message":
            assert f.type is not None
            return Message(message_type(f.type))
        return _DEFAULTS.get(f.kind, 0)

    def HasField(self, name: str) -> bool:
        f = self._type.by_name.get(name)
        if f is None or f.label != PRESENT:
            raise ValueError(f"{self._type.name}.{name} is not a field with presence")
        return name in self._values

    def WhichOneof(self, oneof: str) -> str | None:
        members = self._type.oneofs.get(oneof)
        if members is None:
            raise ValueError(f"{self._type.name} has no oneof {oneof!r}")
        return next((m for m in members if m in self._values), None)

    def ToTimedelta(self) -> timedelta:
        if self._type.name != DURATION:
            raise TypeError(f"{self._type.name} is not a {DURATION}")
        return timedelta(seconds=self.seconds, microseconds=_micros(self.nanos))

    def ToDatetime(self, tzinfo: tzinfo | None = None) -> datetime:
        if self._type.name != TIMESTAMP:
            raise TypeError(f"{self._type.name} is not a {TIMESTAMP}")
        try:
            at = datetime.fromtimestamp(self.seconds, UTC) + timedelta(
                microseconds=_micros(self.nanos)
            )
        except (OverflowError, OSError, ValueError) as e:
            raise DecodeError(f"{TIMESTAMP} out of range: {e}") from None
        return at.astimezone(tzinfo) if tzinfo is not None else at.replace(tzinfo=None)

    def __repr__(self) -> str:
        return f"{self._type.name}({self._values!r})"


def _micros(nanos: int) -> int:
    """Nanoseconds to microseconds, rounded toward zero (as protobuf does)."""
    return nanos // 1000 if nanos >= 0 else -(-nanos // 1000)


# --- decoding -----------------------------------------------------------------------------------


def decode(type_name: str, data: bytes) -> Message:
    """Parse ``data`` as message ``type_name``; :class:`DecodeError` if it is not one."""
    t = message_type(type_name)
    values: dict[str, Any] = {}
    _merge(t, memoryview(data), 0, len(data), values, 0)
    return Message(t, values)


def decoder(type_name: str) -> Callable[[bytes], Message]:
    """``decode`` for one message type (what a stream's deserializer takes)."""
    message_type(type_name)  # an unknown name fails here, not on the first message
    return lambda data: decode(type_name, data)


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise DecodeError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result & 0xFFFF_FFFF_FFFF_FFFF, pos
        shift += 7
        if shift >= 70:
            raise DecodeError("varint longer than 10 bytes")


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _from_varint(kind: str, v: int) -> Any:
    if kind == "bool":
        return v != 0
    if kind == "uint64":
        return v
    if kind == "uint32":
        return v & 0xFFFF_FFFF
    if kind in ("int32", "enum"):
        return _signed(v, 32)
    if kind == "int64":
        return _signed(v, 64)
    zigzag = (v >> 1) ^ -(v & 1)
    return _signed(zigzag, 32) if kind == "sint32" else zigzag


def _length(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    n, pos = _varint(buf, pos, end)
    if n > end - pos:
        raise DecodeError("length-delimited field runs past the end of its message")
    return pos + n, pos


def _skip(buf: memoryview, pos: int, end: int, wire: int, number: int, depth: int) -> int:
    if wire == 0:
        return _varint(buf, pos, end)[1]
    if wire == 1:
        pos += 8
    elif wire == 5:
        pos += 4
    elif wire == 2:
        return _length(buf, pos, end)[0]
    elif wire == 3:  # a group: skip to its end tag
        if depth >= MAX_DEPTH:
            raise DecodeError("groups nested too deeply")
        while True:
            key, pos = _varint(buf, pos, end)
            if not 0 < key >> 3 <= MAX_FIELD_NUMBER:
                raise DecodeError(f"field number {key >> 3} out of range")
            if key & 7 == 4:
                if key >> 3 != number:
                    raise DecodeError("end of group with another field number")
                return pos
            pos = _skip(buf, pos, end, key & 7, key >> 3, depth + 1)
    else:
        raise DecodeError(f"unexpected wire type {wire}")
    if pos > end:
        raise DecodeError("truncated fixed-width field")
    return pos


def _scalar(f: Field, buf: memoryview, pos: int, end: int) -> tuple[Any, int]:
    """One non-message value of ``f`` at ``pos`` (its wire type already checked)."""
    if f.wire == 0:
        v, pos = _varint(buf, pos, end)
        return _from_varint(f.kind, v), pos
    if f.wire == 5 or f.wire == 1:
        fmt = _FIXED32.get(f.kind) or _FIXED64[f.kind]
        size = 4 if f.wire == 5 else 8
        if pos + size > end:
            raise DecodeError("truncated fixed-width field")
        return struct.unpack_from(fmt, buf, pos)[0], pos + size
    stop, start = _length(buf, pos, end)
    raw = bytes(buf[start:stop])
    if f.kind == "string":
        try:
            return raw.decode("utf-8"), stop
        except UnicodeDecodeError:
            raise DecodeError(f"field {f.name} is not valid UTF-8") from None
    return raw, stop


def _merge(
    t: MessageType, buf: memoryview, pos: int, end: int, values: dict[str, Any], depth: int
) -> None:
    if depth > MAX_DEPTH:
        raise DecodeError("messages nested too deeply")
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if not 0 < number <= MAX_FIELD_NUMBER:
            raise DecodeError(f"field number {number} out of range")
        f = t.by_number.get(number)
        if f is None or (wire != f.wire and not (wire == 2 and f.label == REPEATED)):
            if wire == 4:
                raise DecodeError("end of group without its start")
            pos = _skip(buf, pos, end, wire, number, depth)
            continue
        if f.kind == "message":
            stop, start = _length(buf, pos, end)
            assert f.type is not None
            sub_t = message_type(f.type)
            if f.label == MAP:
                entry: dict[str, Any] = {}
                _merge(sub_t, buf, start, stop, entry, depth + 1)
                entry_msg = Message(sub_t, entry)
                values.setdefault(f.name, {})[entry_msg.key] = entry_msg.value
            elif f.label == REPEATED:
                sub: dict[str, Any] = {}
                _merge(sub_t, buf, start, stop, sub, depth + 1)
                values.setdefault(f.name, []).append(Message(sub_t, sub))
            else:
                existing = values.get(f.name)
                if existing is None:
                    existing = values[f.name] = Message(sub_t)
                _merge(sub_t, buf, start, stop, existing._values, depth + 1)
            pos = stop
        elif f.label == REPEATED:
            items = values.setdefault(f.name, [])
            if wire == 2 and f.wire != 2:  # packed
                stop, pos = _length(buf, pos, end)
                while pos < stop:
                    value, pos = _scalar(f, buf, pos, stop)
                    items.append(value)
            else:
                value, pos = _scalar(f, buf, pos, end)
                items.append(value)
            continue
        else:
            values[f.name], pos = _scalar(f, buf, pos, end)
        if f.oneof is not None:
            for other in t.oneofs[f.oneof]:
                if other != f.name:
                    values.pop(other, None)


# --- encoding -----------------------------------------------------------------------------------


def encode(type_name: str, values: Mapping[str, Any] | None = None, /, **fields: Any) -> bytes:
    """Serialize message ``type_name`` from field values (nested messages as mappings).

    Proto3 rules: a field without presence is left out when it holds its default; a field
    with presence is written when given (not None). Unknown names raise ``KeyError``.
    """
    out = bytearray()
    _encode(message_type(type_name), {**(values or {}), **fields}, out)
    return bytes(out)


def _put_varint(out: bytearray, v: int) -> None:
    v &= 0xFFFF_FFFF_FFFF_FFFF
    while v > 0x7F:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _put_value(out: bytearray, f: Field, value: Any) -> None:
    if f.kind == "message":
        assert f.type is not None
        body = bytearray()
        _encode(message_type(f.type), value, body)
        _put_varint(out, f.number << 3 | 2)
        _put_varint(out, len(body))
        out += body
        return
    expected = _PYTHON_TYPES.get(f.kind, (int,))
    if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
        raise TypeError(f"field {f.name} ({f.kind}) cannot hold {type(value).__name__} {value!r}")
    _put_varint(out, f.number << 3 | f.wire)
    if f.wire == 0:
        if f.kind in ("sint32", "sint64"):
            value = (value << 1) ^ (value >> 63)
        _put_varint(out, int(value))
    elif f.wire in (1, 5):
        out += struct.pack(_FIXED32.get(f.kind) or _FIXED64[f.kind], value)
    else:
        raw = value.encode("utf-8") if f.kind == "string" else bytes(value)
        _put_varint(out, len(raw))
        out += raw


def _encode(t: MessageType, values: Mapping[str, Any], out: bytearray) -> None:
    unknown = set(values) - set(t.by_name)
    if unknown:
        raise KeyError(f"{t.name} has no field {sorted(unknown)[0]!r}")
    for f in sorted(t.by_name.values(), key=lambda f: f.number):
        value = values.get(f.name)
        if value is None:
            continue
        if f.label == REPEATED:
            for item in value:
                _put_value(out, f, item)
        elif f.label == MAP:
            entry_t = message_type(f.type) if f.type is not None else None
            assert entry_t is not None
            entry = Field(f.name, f.number, "message", PRESENT, None, entry_t.name)
            for k, v in value.items():
                _put_value(out, entry, {"key": k, "value": v})
        elif f.label == PRESENT or not _is_default(f.kind, value):
            _put_value(out, f, value)


def _is_default(kind: str, value: Any) -> bool:
    if kind in ("float", "double"):  # -0.0 is not the default: protobuf writes it
        return value == 0 and math.copysign(1.0, value) > 0
    return bool(value == _DEFAULTS.get(kind, 0))
