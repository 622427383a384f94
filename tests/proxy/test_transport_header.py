"""Transport header: round trips, byte-exact protobuf, incremental parsing and bad input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import TransportHeaderError
from proxy.transport_header import ALPN, PREFACE, SessionProtocol, TransportHeader, decode


def test_bytes_match_protobuf_encoding() -> None:
    # port=8080 (0x08 0x90 0x3f), name="web" (0x12 0x03 ...), http1 (0x1a 0x02 0x0a 0x00).
    h = TransportHeader(8080, "web", SessionProtocol.HTTP1)
    msg = b"\x08\x90\x3f\x12\x03web\x1a\x02\x0a\x00"
    assert h.encode() == PREFACE + len(msg).to_bytes(4, "big") + msg
    assert ALPN == b"transport.l5d.io/v1"


@given(
    st.integers(1, 65535),
    st.one_of(st.none(), st.from_regex(r"[a-z0-9.-]{1,60}", fullmatch=True)),
    st.sampled_from([None, SessionProtocol.HTTP1, SessionProtocol.HTTP2]),
    st.binary(max_size=20),
)
def test_round_trip_and_incremental(port: int, name: str | None, proto, tail: bytes) -> None:
    header = TransportHeader(port, name, proto)
    wire = header.encode()
    assert decode(wire + tail) == (header, len(wire))
    for cut in range(len(wire)):
        assert decode(wire[:cut]) is None


def test_unknown_fields_are_skipped() -> None:
    msg = b"\x08\x50" + b"\x20\x05" + b"\x2a\x01x" + b"\x35abcd" + b"\x39abcdefgh"
    wire = PREFACE + len(msg).to_bytes(4, "big") + msg
    assert decode(wire) == (TransportHeader(80), len(wire))


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"GET / HTTP/1.1\r\n", "preface"),
        (PREFACE + (70000).to_bytes(4, "big"), "exceeds"),
        (PREFACE + b"\x00\x00\x00\x02\x12\x00", "no target port"),
        (PREFACE + b"\x00\x00\x00\x02\x08\x00", "between 1 and 65535"),
        (PREFACE + b"\x00\x00\x00\x02\x08\x80", "inside a varint"),
        (PREFACE + b"\x00\x00\x00\x03\x12\x05a", "runs past"),
        (PREFACE + b"\x00\x00\x00\x01\x0b", "wire type"),
        (PREFACE + b"\x00\x00\x00\x0b" + b"\x08" + b"\xff" * 9 + b"\x01", "between 1 and 65535"),
    ],
)
def test_bad_headers(wire: bytes, message: str) -> None:
    with pytest.raises(TransportHeaderError, match=message):
        decode(wire)


def test_validation() -> None:
    with pytest.raises(TransportHeaderError):
        TransportHeader(0)
    with pytest.raises(TypeError):
        TransportHeader("80")  # type: ignore[arg-type]
    with pytest.raises(TransportHeaderError):
        TransportHeader(80, "")


@given(st.binary(max_size=80))
def test_fuzz_never_crashes(data: bytes) -> None:
    try:
        decode(PREFACE + data)
    except TransportHeaderError:
        pass
