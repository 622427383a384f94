"""Opaque TCP through an upstream listener and mesh TLS: half-close, policy, classical clients."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil

import pytest
from loopback import unused_port
from proxy_mesh import (
    FlakyPeer,
    behind_the_mesh,
    half_closed_exchange,
    read_all_then_reply,
    run_mesh,
    sample,
)

from proxy.policy import DefaultPolicy, InboundPolicy

pytestmark = pytest.mark.timeout(60)


async def _counted_session(port: int, n: int) -> None:
    """Send ``n`` bytes through the upstream listener on ``port``, half-close, and check the
    byte count read_all_then_reply answers."""
    assert await half_closed_exchange(port, b"x" * n) == b"got %d" % n


async def test_opaque_relay_with_half_close(pki) -> None:
    async with behind_the_mesh(pki, read_all_then_reply, opaque=True) as mesh:
        port = mesh.client.port("upstream:tcp-echo")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = os.urandom(2 * 1024 * 1024)
        writer.write(payload)
        await writer.drain()
        writer.write_eof()  # half-close: the server only answers after our EOF
        async with asyncio.timeout(10):
            assert await reader.read(-1) == b"got %d" % len(payload)
        writer.close()
        text = mesh.server.metrics.render()
        web_id = pki.credentials("web").identity
        assert sample(text, "inbound_tcp_authz_allow_total", client_id=web_id) == 1


async def test_an_opaque_endpoint_refusing_connections_is_passed_over(pki) -> None:
    async with behind_the_mesh(pki, read_all_then_reply, opaque=True) as mesh:
        svc = mesh.routes.by_name("tcp-echo")
        assert svc is not None
        (live,) = svc.endpoints
        dead = [dataclasses.replace(live, proxy_port=unused_port()) for _ in range(3)]
        mesh.routes.replace((dataclasses.replace(svc, endpoints=(*dead, live)),))
        port = mesh.client.port("upstream:tcp-echo")
        for n in range(20):
            await _counted_session(port, n)
        text = mesh.server.metrics.render()
        web_id = pki.credentials("web").identity
        assert sample(text, "inbound_tcp_authz_allow_total", client_id=web_id) == 20


async def test_an_opaque_endpoint_is_reconnected_without_reaching_its_application(pki) -> None:
    """While an opaque endpoint is down the proxy reconnects to it in the background, up to
    the end of the TLS handshake: the application behind the peer never sees those
    connections, only the sessions relayed to it."""
    accepted = 0

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await read_all_then_reply(reader, writer)

    async with (
        FlakyPeer().running() as flaky,
        behind_the_mesh(pki, app, opaque=True) as mesh,
    ):
        out = mesh.client.outbound
        assert out is not None
        out.connector.connect_timeout = 0.3
        svc = mesh.routes.by_name("tcp-echo")
        assert svc is not None
        (live,) = svc.endpoints
        stalled = dataclasses.replace(live, proxy_port=flaky.port)
        svc = dataclasses.replace(svc, endpoints=(stalled, live))
        mesh.routes.replace((svc,))
        balancer = out.balancer(svc, out.clock())
        balancer.state(live).pending = 1000  # picks prefer the stalled one when it is up
        port = mesh.client.port("upstream:tcp-echo")
        # The first session waits out the stalled endpoint's connect timeout, then fails over.
        await _counted_session(port, 1)
        assert balancer.is_down(stalled)
        flaky.relay_to(mesh.server.port("inbound"))
        for _ in range(100):
            if not balancer.is_down(stalled):
                break
            await asyncio.sleep(0.02)
        assert not balancer.is_down(stalled) and flaky.relayed == 1
        assert accepted == 1  # the reconnection stopped after its handshake
        await _counted_session(port, 2)  # through the recovered endpoint
        assert flaky.relayed == 2 and accepted == 2
        text = mesh.server.metrics.render()
        web_id = pki.credentials("web").identity
        assert sample(text, "inbound_tcp_authz_allow_total", client_id=web_id) == 2


async def test_tcp_denied_by_policy_is_closed(pki) -> None:
    deny = InboundPolicy(DefaultPolicy.DENY)
    async with behind_the_mesh(pki, read_all_then_reply, opaque=True, policy=deny) as mesh:
        assert await half_closed_exchange(mesh.client.port("upstream:tcp-echo"), b"hello") == b""
        text = mesh.server.metrics.render()
        assert sample(text, "inbound_tcp_authz_deny_total", target_port=str(mesh.app_port)) == 1


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
async def test_classical_only_client_is_refused_under_hybrid_required(pki, tmp_path) -> None:
    web, api = pki.credentials("web"), pki.credentials("api")
    (tmp_path / "ca.pem").write_bytes(pki.bundle.pem())
    async with run_mesh(web, api, app_port=9) as mesh:
        inbound = mesh.server.port("inbound")

        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-connect", f"127.0.0.1:{inbound}", "-tls1_3",
            "-groups", "X25519", "-servername", api.identity,
            "-CAfile", str(tmp_path / "ca.pem"),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            async with asyncio.timeout(20):
                output, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        text = mesh.server.metrics.render()
        assert (
            'tls_handshakes_total{direction="inbound",group="x25519",result="kex_refused"} 1'
            in text
        )
        assert b"x25519" in output.lower()


async def test_a_stopping_proxy_cuts_an_opaque_stream_after_its_grace(pki) -> None:
    """An opaque stream has no request boundary to end it at: draining leaves it running for
    the grace, then cuts it; the listener takes no new connection meanwhile."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)
        writer.close()

    async with behind_the_mesh(pki, hold, opaque=True) as mesh:
        port = mesh.client.port("upstream:tcp-echo")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello")
        await writer.drain()
        await asyncio.sleep(0.2)  # relayed and open
        loop = asyncio.get_running_loop()
        started = loop.time()
        stopping = asyncio.ensure_future(mesh.client.stop(grace=0.5))
        await asyncio.sleep(0.1)
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        assert not stopping.done()  # the stream still runs within the grace
        await asyncio.wait_for(stopping, 5)
        assert 0.5 <= loop.time() - started < 2
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(-1), 5) == b""
        writer.close()
