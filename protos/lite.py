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
from typing import Any, ClassVar

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

    __slots__ = (
        "convert", "fixed", "kind", "label", "name", "number", "oneof", "others", "sub", "type",
        "wire",
    )  # fmt: skip

    def __init__(
        self, name: str, number: int, kind: str, label: int, oneof: str | None, type_: str | None
    ) -> None:
        self.name, self.number, self.kind, self.label = name, number, kind, label
        self.oneof, self.type = oneof, type_
        self.others: tuple[str, ...] = ()  # the other members of its oneof
        self.sub: MessageType | None = None  # a message field's type, bound on first use
        self.convert = _VARINT_CONVERT.get(kind)  # varint -> value (None: as it is)
        self.fixed: struct.Struct | None = None
        if kind in _VARINT_KINDS:
            self.wire = 0
        elif kind in _FIXED64:
            self.wire, self.fixed = 1, struct.Struct(_FIXED64[kind])
        elif kind in _FIXED32:
            self.wire, self.fixed = 5, struct.Struct(_FIXED32[kind])
        else:
            self.wire = 2

    def message(self) -> MessageType:
        """The type of a message field (or a map's entry)."""
        sub = self.sub
        if sub is None:
            assert self.type is not None
            sub = self.sub = message_type(self.type)
        return sub


class MessageType:
    """One message's fields, by name and by tag."""

    __slots__ = ("by_name", "cls", "name", "oneofs", "tags")

    def __init__(self, name: str, fields: tuple[tuple[Any, ...], ...]) -> None:
        self.name = name
        self.by_name = {f[0]: Field(*f) for f in fields}
        self.oneofs: dict[str, tuple[str, ...]] = {}
        for f in self.by_name.values():
            if f.oneof is not None:
                self.oneofs[f.oneof] = (*self.oneofs.get(f.oneof, ()), f.name)
        # Tag (number and wire type) -> field: one lookup finds the field and checks the wire
        # type; a repeated number is also read packed. Other tags are unknown fields.
        self.tags: dict[int, Field] = {}
        for f in self.by_name.values():
            self.tags[f.number << 3 | f.wire] = f
            if f.label == REPEATED and f.wire != 2:
                self.tags[f.number << 3 | 2] = f
            if f.oneof is not None:
                f.others = tuple(m for m in self.oneofs[f.oneof] if m != f.name)
        self.cls: type[Message] = type(name.rpartition(".")[2], (Message,), {"_type": self})


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
    """A decoded message: fields as attributes, protobuf's presence methods.

    Each message type has its own subclass (``MessageType.cls``) holding the type, and an
    instance's ``__dict__`` holds exactly the fields that were sent: reading one is a plain
    attribute lookup, and ``__getattr__`` runs only for an absent field, to give its default.
    """

    _type: ClassVar[MessageType]

    def __getattr__(self, name: str) -> Any:
        f = self._type.by_name.get(name)
        if f is None:
            raise AttributeError(f"{self._type.name} has no field {name!r}")
        if f.label == REPEATED:
            return []
        if f.label == MAP:
            return {}
        if f.kind == "message":
            return new_message(f.message())
        return _DEFAULTS.get(f.kind, 0)

    def HasField(self, name: str) -> bool:
        f = self._type.by_name.get(name)
        if f is None or f.label != PRESENT:
            raise ValueError(f"{self._type.name}.{name} is not a field with presence")
        return name in self.__dict__

    def WhichOneof(self, oneof: str) -> str | None:
        members = self._type.oneofs.get(oneof)
        if members is None:
            raise ValueError(f"{self._type.name} has no oneof {oneof!r}")
        values = self.__dict__
        return next((m for m in members if m in values), None)

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
        return f"{self._type.name}({self.__dict__!r})"


def new_message(t: MessageType, values: dict[str, Any] | None = None) -> Message:
    """A message of type ``t`` whose fields are ``values`` (the dict itself, not a copy)."""
    msg: Message = object.__new__(t.cls)
    if values is not None:
        msg.__dict__ = values
    return msg


def _micros(nanos: int) -> int:
    """Nanoseconds to microseconds, rounded toward zero (as protobuf does)."""
    return nanos // 1000 if nanos >= 0 else -(-nanos // 1000)


# --- decoding -----------------------------------------------------------------------------------


def decode(type_name: str, data: bytes) -> Message:
    """Parse ``data`` as message ``type_name``; :class:`DecodeError` if it is not one."""
    t = message_type(type_name)
    values: dict[str, Any] = {}
    buf = bytes(data)
    _merge(t, buf, 0, len(buf), values, 0)
    return new_message(t, values)


def decoder(type_name: str) -> Callable[[bytes], Message]:
    """``decode`` for one message type (what a stream's deserializer takes)."""
    message_type(type_name)  # an unknown name fails here, not on the first message
    return lambda data: decode(type_name, data)


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
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


def _signed32(v: int) -> int:
    v &= 0xFFFF_FFFF
    return v - (1 << 32) if v >> 31 else v


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


def _zigzag32(v: int) -> int:
    return _signed32((v >> 1) ^ -(v & 1))


# How a varint reads for each kind; uint64 and enum-less kinds not listed read as they are.
_VARINT_CONVERT: dict[str, Callable[[int], Any]] = {
    "bool": bool,
    "uint32": lambda v: v & 0xFFFF_FFFF,
    "int32": _signed32,
    "enum": _signed32,
    "int64": _signed64,
    "sint32": _zigzag32,
    "sint64": lambda v: (v >> 1) ^ -(v & 1),
}


def _length(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """(end, start) of the length-delimited value whose length varint is at ``pos``."""
    if pos >= end:
        raise DecodeError("truncated varint")
    n = buf[pos]
    if n < 0x80:
        pos += 1
    else:
        n, pos = _varint(buf, pos, end)
    if n > end - pos:
        raise DecodeError("length-delimited field runs past the end of its message")
    return pos + n, pos


def _skip(buf: bytes, pos: int, end: int, wire: int, number: int, depth: int) -> int:
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


def _scalar(f: Field, buf: bytes, pos: int, end: int) -> tuple[Any, int]:
    """One non-message value of ``f`` at ``pos`` (its wire type already checked)."""
    if f.wire == 0:
        v = buf[pos] if pos < end else 0x80
        if v < 0x80:
            pos += 1
        else:
            v, pos = _varint(buf, pos, end)
        convert = f.convert
        return (convert(v) if convert is not None else v), pos
    fixed = f.fixed
    if fixed is not None:
        if pos + fixed.size > end:
            raise DecodeError("truncated fixed-width field")
        return fixed.unpack_from(buf, pos)[0], pos + fixed.size
    stop, start = _length(buf, pos, end)
    if f.kind == "string":
        try:
            return buf[start:stop].decode("utf-8"), stop
        except UnicodeDecodeError:
            raise DecodeError(f"field {f.name} is not valid UTF-8") from None
    return buf[start:stop], stop


def _merge(
    t: MessageType, buf: bytes, pos: int, end: int, values: dict[str, Any], depth: int
) -> bool:
    """Read the fields of ``t`` in ``buf[pos:end]`` into ``values``; True if some were
    unknown (skipped)."""
    if depth > MAX_DEPTH:
        raise DecodeError("messages nested too deeply")
    unknown = False
    tags = t.tags
    while pos < end:
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _varint(buf, pos, end)
        f = tags.get(key)
        if f is None:  # an unknown field, or a known number with another wire type
            number, wire = key >> 3, key & 7
            if not 0 < number <= MAX_FIELD_NUMBER:
                raise DecodeError(f"field number {number} out of range")
            if wire == 4:
                raise DecodeError("end of group without its start")
            pos = _skip(buf, pos, end, wire, number, depth)
            unknown = True
            continue
        name = f.name
        if f.kind == "message":
            stop, start = _length(buf, pos, end)
            sub_t = f.message()
            label = f.label
            if label == MAP:
                entry: dict[str, Any] = {}
                entries = values.setdefault(name, {})
                # An entry with unknown fields is not an entry of the map (upb keeps it aside
                # as unknown data): it is left out.
                if not _merge(sub_t, buf, start, stop, entry, depth + 1):
                    entry_msg = new_message(sub_t, entry)
                    entries[entry_msg.key] = entry_msg.value
            elif label == REPEATED:
                sub: dict[str, Any] = {}
                _merge(sub_t, buf, start, stop, sub, depth + 1)
                values.setdefault(name, []).append(new_message(sub_t, sub))
            else:
                existing = values.get(name)
                if existing is None:
                    existing = values[name] = new_message(sub_t)
                _merge(sub_t, buf, start, stop, existing.__dict__, depth + 1)
            pos = stop
        elif f.label == REPEATED:
            items = values.setdefault(name, [])
            if key & 7 == 2 and f.wire != 2:  # packed
                stop, pos = _length(buf, pos, end)
                while pos < stop:
                    value, pos = _scalar(f, buf, pos, stop)
                    items.append(value)
            else:
                value, pos = _scalar(f, buf, pos, end)
                items.append(value)
            continue
        else:
            values[name], pos = _scalar(f, buf, pos, end)
        for other in f.others:
            values.pop(other, None)
    return unknown


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
