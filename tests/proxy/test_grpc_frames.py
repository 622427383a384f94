"""gRPC framing without I/O: timeouts, length-prefixed messages, statuses, HTTP/2 frame cuts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protos.rpc import RpcError, StatusCode
from proxy.grpc_frames import (
    FrameSplitter,
    MessageReader,
    call_status,
    encode_timeout,
    frame,
    has_status,
    request_headers,
    response_error,
)


def test_timeouts_use_the_finest_unit_that_fits_and_never_round_down() -> None:
    assert encode_timeout(10) == "10000000u"
    assert encode_timeout(0.0000001) == "1u"
    assert encode_timeout(1000) == "1000000m"
    assert encode_timeout(99_999_999.5) == "1666667M"
    assert encode_timeout(1e12) == "99999999H"  # 277,777,778 hours: more than 8 digits
    with pytest.raises(ValueError):
        encode_timeout(0)


def test_request_headers_name_the_call_and_refuse_a_bad_method() -> None:
    headers = dict(request_headers("/p.S/M", "svc.example", tls=True, timeout=2))
    assert headers[":path"] == "/p.S/M" and headers[":scheme"] == "https"
    assert headers["content-type"] == "application/grpc" and headers["te"] == "trailers"
    assert headers["grpc-timeout"] == "2000000u"
    assert "grpc-timeout" not in dict(request_headers("/p.S/M", "a", tls=False, timeout=None))
    for bad in ("p.S/M", "/p.S", "/p/S/M"):
        with pytest.raises(ValueError, match=r"/package\.Service/Method"):
            request_headers(bad, "a", tls=True, timeout=None)


@given(st.lists(st.binary(max_size=300), max_size=6), st.integers(1, 50))
def test_messages_come_out_whole_however_the_bytes_are_cut(
    messages: list[bytes], step: int
) -> None:
    wire = b"".join(frame(m) for m in messages)
    reader = MessageReader()
    out = []
    for i in range(0, len(wire), step):
        out += reader.feed(wire[i : i + step])
    assert out == messages and not reader.partial


def test_a_compressed_or_oversized_message_is_refused_from_its_prefix() -> None:
    with pytest.raises(RpcError) as e:
        MessageReader().feed(b"\x01\x00\x00\x00\x01x")
    assert e.value.code is StatusCode.INTERNAL and "compressed" in e.value.details
    reader = MessageReader(limit=10)
    with pytest.raises(RpcError) as e:
        reader.feed(b"\x00\x00\x00\x00\x0b")  # 11 bytes announced, none sent yet
    assert e.value.code is StatusCode.RESOURCE_EXHAUSTED and "11 bytes" in e.value.details
    partial = MessageReader()
    assert partial.feed(frame(b"abc")[:6]) == [] and partial.partial


def test_call_status_reads_the_trailers() -> None:
    assert call_status([("grpc-status", "0")]) is None
    error = call_status([("grpc-status", "5"), ("grpc-message", "no%20such%20service%3A%20%C3%A9")])
    assert error is not None and error.code is StatusCode.NOT_FOUND
    assert error.details == "no such service: é"
    unknown = call_status([("grpc-status", "99")])
    assert unknown is not None and unknown.code is StatusCode.UNKNOWN
    missing = call_status([("content-type", "application/grpc")])
    assert missing is not None and missing.code is StatusCode.INTERNAL
    assert has_status([("grpc-status", "0")]) and not has_status([(":status", "200")])


def test_a_response_that_is_not_grpc_maps_by_http_status() -> None:
    ok = [(":status", "200"), ("content-type", "application/grpc+proto")]
    assert response_error(ok) is None
    cases = {"404": StatusCode.UNIMPLEMENTED, "503": StatusCode.UNAVAILABLE,
             "401": StatusCode.UNAUTHENTICATED, "418": StatusCode.UNKNOWN}  # fmt: skip
    for status, code in cases.items():
        error = response_error([(":status", status), ("content-type", "application/grpc")])
        assert error is not None and error.code is code and status in error.details
    html = response_error([(":status", "200"), ("content-type", "text/html")])
    assert html is not None and html.code is StatusCode.UNKNOWN and "text/html" in html.details


def _h2_frame(kind: int, payload: bytes, stream: int = 0) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, 0]) + stream.to_bytes(4, "big") + payload


@given(st.lists(st.binary(max_size=100), min_size=1, max_size=5), st.integers(1, 40))
def test_http2_bytes_are_cut_at_frame_boundaries(payloads: list[bytes], step: int) -> None:
    frames = [_h2_frame(0, p, 1) for p in payloads]
    wire = b"".join(frames)
    splitter = FrameSplitter()
    out = []
    for i in range(0, len(wire), step):
        out += splitter.feed(wire[i : i + step])
    assert out == frames
