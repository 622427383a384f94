"""Protocol detection: real ClientHellos from OpenSSL, request lines, the h2 preface, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from proxy.detect import (
    H2_PREFACE,
    HTTP1,
    HTTP2,
    MAX_TLS_BYTES,
    NEED_MORE,
    OPAQUE,
    Detected,
    Proto,
    detect,
)

SNI = "web.default.serviceaccount.identity.trustmesh.cluster.local"


def client_hello(sni: str | None = SNI) -> bytes:
    """The first flight of a real OpenSSL TLS 1.3 client (hybrid key share included)."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    conn = SSL.Connection(ctx, None)
    if sni is not None:
        conn.set_tlsext_host_name(sni.encode())
    conn.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(65536)


def split_records(hello: bytes, size: int) -> bytes:
    """Re-frame one handshake record as several records of at most ``size`` payload bytes."""
    payload = hello[5:]
    out = b""
    for i in range(0, len(payload), size):
        part = payload[i : i + size]
        out += hello[:3] + len(part).to_bytes(2, "big") + part
    return out


def test_client_hello_sni_and_every_prefix_needs_more() -> None:
    hello = client_hello()
    assert len(hello) > 1000  # the ML-KEM key share makes it large
    assert detect(hello) == Detected(Proto.TLS, SNI)
    for cut in range(len(hello)):
        assert detect(hello[:cut]) is NEED_MORE, cut


def test_client_hello_without_sni() -> None:
    assert detect(client_hello(None)) == Detected(Proto.TLS, None)


def test_client_hello_split_over_records() -> None:
    framed = split_records(client_hello(), 100)
    assert detect(framed) == Detected(Proto.TLS, SNI)
    assert detect(framed[:-1]) is NEED_MORE


def test_tls_looking_garbage() -> None:
    assert detect(b"\x16\x09\x01\x00\x10") == OPAQUE  # wrong version byte
    assert detect(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00") == OPAQUE  # ServerHello, not client
    huge = b"\x16\x03\x01\x40\x00\x01\xff\xff\xff"
    assert detect(huge) == Detected(Proto.TLS)  # announces more than we buffer


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /a?b=c HTTP/1.0\r\n",
        b"OPTIONS * HTTP/1.1\n",
        b"GET http://web:8080/x HTTP/1.1\r\n",
    ],
)
def test_http1(data: bytes) -> None:
    assert detect(data) == HTTP1


@pytest.mark.parametrize(
    "data",
    [
        b"G",
        b"GET",
        b"GET ",
        b"GET /",
        b"GET / ",
        b"GET / HTTP/1",
        b"GET / HTTP/1.1",
        b"GET / HTTP/1.1\r",
    ],
)
def test_http1_prefixes_need_more(data: bytes) -> None:
    assert detect(data) is NEED_MORE
    assert detect(data, eof=True) == OPAQUE


@pytest.mark.parametrize(
    "data",
    [
        b"GET  / HTTP/1.1\r\n",
        b"GET / HTTP/2.0\r\n",
        b"\x00\x01\x02",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"GET / HTTP/1.1 extra\r\n",
        b"A" * 1024,
        b"*1\r\n$4\r\nPING\r\n",
    ],
)
def test_opaque(data: bytes) -> None:
    assert detect(data) == OPAQUE


def test_a_request_line_longer_than_the_window_is_http1() -> None:
    long_url = b"GET /search?q=" + b"a" * 4000
    assert detect(long_url) == HTTP1
    assert detect(long_url + b" HTTP/1.1\r\nHost: x\r\n\r\n") == HTTP1
    assert detect(b"POST http://api.example/" + b"b" * 2000) == HTTP1
    assert detect(b"GET " + b"\x01" * 2000) == OPAQUE  # not a target
    assert detect(b"A" * 2000) == OPAQUE  # no method, space, target


def test_h2_preface() -> None:
    assert detect(H2_PREFACE + b"\x00\x00\x00\x04") == HTTP2
    for cut in range(1, len(H2_PREFACE)):
        assert detect(H2_PREFACE[:cut]) is NEED_MORE
    assert detect(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n") == OPAQUE


def test_empty() -> None:
    assert detect(b"") is NEED_MORE
    assert detect(b"", eof=True) == OPAQUE


def test_detected_validates() -> None:
    with pytest.raises(ValueError, match="sni"):
        Detected(Proto.HTTP1, "x")
    with pytest.raises(TypeError):
        Detected("tls")  # type: ignore[arg-type]


HELLO = client_hello()
SAMPLES = [HELLO, split_records(HELLO, 333), H2_PREFACE, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_never_raises_and_decisions_are_stable(data: bytes) -> None:
    verdict = detect(data)
    assert verdict is NEED_MORE or isinstance(verdict, Detected)
    assert isinstance(detect(data, eof=True), Detected)
    if isinstance(verdict, Detected):
        # A decision never changes when more bytes arrive.
        assert detect(data + b"\x16\x03\x01 more GET / HTTP/1.1\r\n") == verdict


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SAMPLES), st.data())
def test_fuzz_prefixes_and_mutations_of_real_inputs(sample: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(sample)))
    verdict = detect(sample[:cut])
    assert verdict is NEED_MORE or verdict == detect(sample)
    at = data.draw(st.integers(0, len(sample) - 1))
    mutated = sample[:at] + bytes([data.draw(st.integers(0, 255))]) + sample[at + 1 :]
    result = detect(mutated)
    assert result is NEED_MORE or isinstance(result, Detected)
    assert len(sample) < MAX_TLS_BYTES
