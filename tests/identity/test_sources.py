"""The Kubernetes issuer Secret source (watched through kmock) and Kubernetes Events."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import pytest
from identity_testkit import Env
from test_watcher import new_issuer

from identity.errors import IssuerSourceError
from identity.metrics import ReloadStats
from identity.sources import ISSUER_SECRET, TRUST_ROOTS_CONFIGMAP, KubernetesSecretSource
from identity.watcher import EVENT_SKIPPED, EVENT_UPDATED, IssuerWatcher, KubernetesEvents
from pki.certs import Credential, create_anchor, utcnow
from pki.keys import PrivateKey

NS = "trustmesh"


def secret_data(issuer: Credential, ca: bytes) -> dict[str, str]:
    files = {"tls.crt": issuer.chain_pem(), "tls.key": issuer.key.to_pem(), "ca.crt": ca}
    return {k: base64.b64encode(v).decode() for k, v in files.items()}


async def create_issuer_secret(core: Any, issuer: Credential, ca: bytes, **fields: Any) -> None:
    """The issuer Secret in kmock, with ``issuer``'s chain and key and ``ca`` as ca.crt."""
    body = {
        "metadata": {"name": ISSUER_SECRET, "namespace": NS},
        "data": secret_data(issuer, ca),
        **fields,
    }
    await asyncio.to_thread(core.create_namespaced_secret, NS, body)


async def revision_moves(source: KubernetesSecretSource, before: object, event: str) -> None:
    """Wait (at most 5 s) until ``source`` has applied an event after revision ``before``."""
    deadline = time.monotonic() + 5
    while source.revision() == before:
        assert time.monotonic() < deadline, f"the {event} event was not applied"
        await asyncio.sleep(0.02)


async def reload_until(watcher: IssuerWatcher, expected: str, timeout: float = 5.0) -> None:
    """Poll the watcher off the loop (kmock serves on this loop) until it reports ``expected``."""
    deadline = time.monotonic() + timeout
    while (got := await asyncio.to_thread(watcher.reload)) != expected:
        assert got == "same" and time.monotonic() < deadline, (
            f"got {got!r}, waiting for {expected!r}"
        )
        await asyncio.sleep(0.02)


async def test_secret_watch_reloads_and_records_events(env: Env, k8s: tuple[Any, Any]) -> None:
    from kubernetes import client

    _emulator, api = k8s
    core = client.CoreV1Api(api)
    anchor = env.store.load().anchor_credential()
    bundle_pem = env.store.load().require_bundle().pem().decode()
    await asyncio.to_thread(
        core.create_namespaced_config_map,
        NS,
        {
            "metadata": {"name": TRUST_ROOTS_CONFIGMAP, "namespace": NS},
            "data": {"ca-bundle.crt": bundle_pem},
        },
    )
    first = new_issuer(anchor)
    await create_issuer_secret(core, first, anchor.certificate.pem, type="kubernetes.io/tls")
    source = await asyncio.to_thread(
        KubernetesSecretSource, api, NS, watch_timeout=2, read_timeout=0.5
    )
    installed: list = []
    stats = ReloadStats()
    watcher = IssuerWatcher(
        source, installed.append, lambda: installed[-1] if installed else None,
        clock=utcnow, reloads=stats, events=KubernetesEvents(api, NS, clock=utcnow),
    )  # fmt: skip
    source.start()
    try:
        assert await asyncio.to_thread(watcher.reload) == "updated"
        assert installed[-1].fingerprint == first.certificate.fingerprint

        second = new_issuer(anchor)
        await asyncio.to_thread(
            core.patch_namespaced_secret,
            ISSUER_SECRET,
            NS,
            {"data": secret_data(second, anchor.certificate.pem)},
        )
        await reload_until(watcher, "updated")
        assert installed[-1].fingerprint == second.certificate.fingerprint

        rogue_key = PrivateKey.generate()
        rogue = Credential(create_anchor(rogue_key, now=utcnow()), rogue_key)
        await asyncio.to_thread(
            core.patch_namespaced_secret,
            ISSUER_SECRET,
            NS,
            {"data": secret_data(new_issuer(rogue), rogue.certificate.pem)},
        )
        await reload_until(watcher, "refused")
        assert installed[-1].fingerprint == second.certificate.fingerprint  # old one kept
        assert stats.counts()["refused"] == 1

        events = (await asyncio.to_thread(core.list_namespaced_event, NS)).items
        reasons = [
            (e.reason, e.type, e.involved_object.kind, e.involved_object.name) for e in events
        ]
        assert reasons.count((EVENT_UPDATED, "Normal", "Deployment", "trustmesh-identity")) == 2
        assert (EVENT_SKIPPED, "Warning", "Deployment", "trustmesh-identity") in reasons
        skipped = next(e for e in events if e.reason == EVENT_SKIPPED)
        assert "does not verify" in skipped.message
    finally:
        await asyncio.to_thread(source.stop)


async def test_anchors_fall_back_to_ca_crt_and_missing_secret(
    env: Env, k8s: tuple[Any, Any]
) -> None:
    from kubernetes import client

    _emulator, api = k8s
    core = client.CoreV1Api(api)
    anchor = env.store.load().anchor_credential()
    issuer = new_issuer(anchor)
    await create_issuer_secret(core, issuer, anchor.certificate.pem)
    source = await asyncio.to_thread(KubernetesSecretSource, api, NS)
    assert source.anchors.anchors == (anchor.certificate,)
    cred, _ = source.load()
    assert cred.certificate == issuer.certificate


async def test_watch_events_apply_without_a_relist(env: Env, k8s: tuple[Any, Any]) -> None:
    """MODIFIED and DELETED events from the open watch are applied as they arrive: with watch
    and read timeouts of a minute nothing re-lists during the test, so only events explain it."""
    from kubernetes import client

    _emulator, api = k8s
    core = client.CoreV1Api(api)
    anchor = env.store.load().anchor_credential()
    first = new_issuer(anchor)
    await create_issuer_secret(core, first, anchor.certificate.pem)
    source = await asyncio.to_thread(
        KubernetesSecretSource, api, NS, watch_timeout=60, read_timeout=60.0
    )
    source.start()
    try:
        second = new_issuer(anchor)
        await asyncio.sleep(0.3)  # let the watch open (its first events repeat the listed state)
        before = source.revision()
        await asyncio.to_thread(
            core.patch_namespaced_secret,
            ISSUER_SECRET,
            NS,
            {"data": secret_data(second, anchor.certificate.pem)},
        )
        await revision_moves(source, before, "MODIFIED")
        cred, _ = source.load()
        assert cred.certificate == second.certificate

        before = source.revision()
        await asyncio.to_thread(core.delete_namespaced_secret, ISSUER_SECRET, NS)
        await revision_moves(source, before, "DELETED")
        with pytest.raises(IssuerSourceError, match="does not exist"):
            source.load()
    finally:
        # The watch thread blocks on the stream for up to the read timeout: ask it to stop, then
        # wake it with one more event so that it sees the request now, not in a minute.
        source.stop(0)

        def wake() -> None:
            try:
                core.create_namespaced_secret(
                    NS, {"metadata": {"name": ISSUER_SECRET, "namespace": NS}}
                )
            except client.ApiException:  # still there: the test failed before deleting it
                core.patch_namespaced_secret(
                    ISSUER_SECRET, NS, {"metadata": {"labels": {"w": "1"}}}
                )

        await asyncio.to_thread(wake)
        await asyncio.to_thread(source.stop, 5)
