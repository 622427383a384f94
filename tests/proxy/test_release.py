"""A closed connection is freed by reference counting, not left to the garbage collector.

The proxy raises the collector's thresholds for throughput (``tune_gc``), so a full collection
comes rarely: a connection whose objects form a reference cycle outlives its socket by minutes
to hours, and with it OpenSSL's connection state (the traffic keys included). A soak of the
demo mesh grew the sidecars serving inbound traffic by 0.5 MiB a minute that way. These tests
run each kind of connection with the collector off, close it, and require that nothing of the
proxy's is left alive, nor left over as cyclic garbage.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import weakref
from collections.abc import Iterator

import aiohttp
import pytest
from loopback import unused_port
from OpenSSL import SSL
from proxy_mesh import (
    behind_the_mesh,
    half_closed_exchange,
    raw_exchange,
    read_all_then_reply,
    run_app,
    run_mesh,
)
from test_meshtls_inbound import http_request, tls_exchange
from test_meshtls_protocol import RawClient

from proxy.http1 import MAX_DROPPED_BODY
from proxy.link import Link
from proxy.listener import FullCollections, tune_gc
from proxy.meshtls import TlsSession
from proxy.policy import DefaultPolicy, InboundPolicy
from proxy.routes import Endpoint, Service

pytestmark = pytest.mark.timeout(60)

REQUEST = b"GET /echo HTTP/1.1\r\nHost: api.local\r\nConnection: close\r\n\r\n"


# Sessions and links alive when the test began (an earlier test's lingering close, say).
_EARLIER: set[int] = set()


@pytest.fixture(autouse=True)
def _from_a_clean_heap() -> None:
    gc.collect()  # earlier tests' garbage is not this test's
    _EARLIER.clear()
    _EARLIER.update(id(o) for o in _sessions_and_links())


def _sessions_and_links() -> list[object]:
    return [o for o in gc.get_objects() if isinstance(o, TlsSession | Link)]


def _alive() -> int:
    return sum(id(o) not in _EARLIER for o in _sessions_and_links())


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _ours(obj: object) -> bool:
    module = type(obj).__module__ or ""
    if type(obj).__name__ == "method":
        return _ours(obj.__self__)  # type: ignore[attr-defined]
    return module.startswith(("proxy.", "httptools.")) or type(obj).__qualname__ == "Connection"


def left_behind() -> tuple[int, collections.Counter[str]]:
    """(this test's proxy sessions and links still alive, our types a full collection finds
    as garbage)."""
    alive = _alive()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        garbage = collections.Counter(
            f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage if _ours(o)
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    return alive, garbage


async def assert_all_freed(*pools: object) -> None:
    """Close the idle pooled links (the idle timeout's path) and wait until every proxy link
    has gone; then nothing of ours may be cyclic garbage."""
    for pool in pools:
        pool.close_all()  # type: ignore[attr-defined]
    for _ in range(100):  # the peers see the closes within a few loop turns
        if not _alive():
            break
        await asyncio.sleep(0.02)
    alive, garbage = left_behind()
    assert not garbage, f"closed connections left reference cycles: {dict(garbage)}"
    assert alive == 0, f"{alive} TLS sessions or links outlived their connections"


async def test_http_exchanges_over_the_mesh_free_every_connection(pki) -> None:
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_app() as app_port, run_mesh(web, api, app_port=app_port) as mesh:
        pools = (mesh.client.outbound.pool, mesh.server.inbound.pool)  # type: ignore[union-attr]
        await raw_exchange(mesh.outbound, REQUEST)
        await assert_all_freed(*pools)  # warm: what the first request builds once stays
        with collector_off():
            async with aiohttp.ClientSession() as session:  # keep-alive, pooled mesh link
                for _ in range(5):
                    async with session.get(
                        f"http://127.0.0.1:{mesh.outbound}/echo", headers={"Host": "api.local"}
                    ) as resp:
                        assert resp.status == 200
                        await resp.read()
            for _ in range(3):  # the client closes after each answer
                reply = await raw_exchange(mesh.outbound, REQUEST)
                assert reply.startswith(b"HTTP/1.1 200"), reply
            # HTTP/1.0: the answer is close-delimited, so no link is reused.
            reply = await raw_exchange(
                mesh.outbound, b"GET /echo HTTP/1.0\r\nHost: api.local\r\n\r\n"
            )
            assert reply.startswith(b"HTTP/1."), reply
            await assert_all_freed(*pools)


async def test_a_websocket_relay_frees_its_connections(pki) -> None:
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_app() as app_port, run_mesh(web, api, app_port=app_port) as mesh:
        pools = (mesh.client.outbound.pool, mesh.server.inbound.pool)  # type: ignore[union-attr]
        with collector_off():
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(
                    f"http://127.0.0.1:{mesh.outbound}/ws", headers={"Host": "api.local"}
                ) as ws,
            ):
                await ws.send_str("ping")
                assert (await ws.receive(timeout=10)).data == "echo:ping"
            await assert_all_freed(*pools)


async def test_an_opaque_relay_frees_its_connections(pki) -> None:
    async with behind_the_mesh(pki, read_all_then_reply, opaque=True) as mesh:
        with collector_off():
            for _ in range(3):
                port = mesh.client.port("upstream:tcp-echo")
                assert await half_closed_exchange(port, b"hello") == b"got 5"
            await assert_all_freed()


async def test_refused_requests_and_handshakes_free_their_connections(pki, other_pki) -> None:
    web, api = pki.credentials("web"), pki.credentials("api")
    policy = InboundPolicy(DefaultPolicy.DENY)
    async with run_app() as app_port, run_mesh(web, api, app_port=app_port, policy=policy) as mesh:
        pools = (mesh.client.outbound.pool, mesh.server.inbound.pool)  # type: ignore[union-attr]
        inbound = mesh.server.port("inbound")
        with collector_off():
            for _ in range(3):
                reply = await raw_exchange(mesh.outbound, REQUEST)  # 403 from the server proxy
                assert reply.startswith(b"HTTP/1.1 403"), reply
            # A client certificate from another trust anchor: the handshake fails.
            with pytest.raises((ConnectionError, SSL.Error)):
                await tls_exchange(
                    inbound,
                    RawClient(pki.bundle.pem(), creds=other_pki.credentials("web")),
                    api.identity,
                    http_request(app_port),
                )
            # Plaintext on the inbound port: nowhere configured to send it, closed.
            await raw_exchange(inbound, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await assert_all_freed(*pools)


async def test_failed_exchanges_free_their_connections(pki) -> None:
    """Answers the client proxy makes itself: a peer with another identity (the handshake
    fails), a dead endpoint, an unknown authority, a malformed request, a refused chunked body
    too large to drop, and a client that closes before sending anything."""
    web, api = pki.credentials("web"), pki.credentials("api")
    other = pki.credentials("db").identity
    async with (
        run_app() as app_port,
        run_mesh(web, api, app_port=app_port, expected_identity=other) as mesh,
    ):
        pools = (mesh.client.outbound.pool, mesh.server.inbound.pool)  # type: ignore[union-attr]
        with collector_off():
            reply = await raw_exchange(mesh.outbound, REQUEST)
            assert reply.startswith(b"HTTP/1.1 502"), reply  # the server refuses our SNI
            dead = Endpoint("127.0.0.1", unused_port())
            mesh.routes.replace((Service("api", (dead,), authorities=("api.local",)),))
            reply = await raw_exchange(mesh.outbound, REQUEST)
            assert reply.startswith(b"HTTP/1.1 502"), reply  # connection refused
            reply = await raw_exchange(mesh.outbound, REQUEST.replace(b"api.local", b"nowhere"))
            assert reply.startswith(b"HTTP/1.1 404"), reply
            reply = await raw_exchange(mesh.outbound, b"GET / HTTP/1.1\r\nHost api\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 400"), reply
            big = b"%x\r\n%b\r\n" % (MAX_DROPPED_BODY, b"x" * MAX_DROPPED_BODY)
            reply = await raw_exchange(
                mesh.outbound,
                b"POST / HTTP/1.1\r\nHost: nowhere\r\nTransfer-Encoding: chunked\r\n\r\n" + big,
            )
            assert reply.startswith(b"HTTP/1.1 404"), reply  # then closed: over the drop budget
            reader, writer = await asyncio.open_connection("127.0.0.1", mesh.outbound)
            writer.write_eof()  # EOF before any data: closed without an answer
            async with asyncio.timeout(10):
                assert await reader.read(-1) == b""
            writer.close()
            await assert_all_freed(*pools)


class _Cyclic:
    def __init__(self) -> None:
        self.me = self


async def test_tune_gc_runs_a_full_collection_on_a_timer() -> None:
    """Whatever cycle a rarer path still makes is collected within ``full_every`` seconds, in
    an old generation too, which the raised thresholds alone would reach after hours."""
    before = gc.get_threshold()
    try:
        collections_ = tune_gc(full_every=0.05)
        try:
            assert gc.get_threshold() == (10_000, 50, 100)
            assert gc.get_freeze_count() > 0
            cyclic = _Cyclic()
            gone = weakref.ref(cyclic)
            gc.collect(1)  # promoted: the young collections the thresholds allow never see it
            del cyclic
            for _ in range(100):
                if gone() is None:
                    break
                await asyncio.sleep(0.02)
            assert gone() is None
            assert collections_.runs >= 1
        finally:
            collections_.cancel()
        runs = collections_.runs
        await asyncio.sleep(0.15)
        assert collections_.runs == runs  # cancelled: no more collections
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    with pytest.raises(ValueError, match="positive"):
        FullCollections(0)
