"""--kubernetes trust bundle: the trust-roots ConfigMap, watched through kmock with the official
client, streamed to proxies; invalid bundles refused with the last good one kept."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from destination_testlib import eventually
from kmock_testlib import emulated_api
from kubernetes import client

from destination.bundles import (
    TRUST_ROOTS_CONFIGMAP,
    BundleRefused,
    bundle_from_configmap,
)
from destination.client import Backoff, DestinationClient
from destination.service import DestinationServer, ServeOptions
from pki.bundle import TrustBundle
from pki.certs import Credential, create_anchor, issue_leaf
from pki.keys import PrivateKey
from proxy.rpc import Channel

NOW = datetime(2030, 1, 1, tzinfo=UTC)
NS = "trustmesh"
WHERE = f"ConfigMap {NS}/{TRUST_ROOTS_CONFIGMAP}"


@pytest.fixture(scope="module")
def certs() -> dict[str, bytes]:
    one_key = PrivateKey.generate()
    one = create_anchor(one_key, now=NOW, common_name="anchor one")
    two = create_anchor(PrivateKey.generate(), now=NOW, common_name="anchor two")
    leaf_key = PrivateKey.generate()
    leaf = issue_leaf(leaf_key.public_key(), "web.example", Credential(one, one_key), now=NOW)
    return {"one": one.pem, "two": two.pem, "leaf": leaf.pem}


def configmap(pem: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": TRUST_ROOTS_CONFIGMAP, "namespace": NS},
        "data": {"ca-bundle.crt": pem},
    }


def test_each_invalid_bundle_is_refused_with_its_reason(certs: dict[str, bytes]) -> None:
    cases = {
        "does not exist": None,
        "has no key ca-bundle.crt": {"data": {"other": "x"}},
        "key ca-bundle.crt is empty": configmap("  \n"),
        "no valid PEM certificate": configmap("-----BEGIN CERTIFICATE-----\nAAAA\n"),
        "is not a CA certificate": configmap(certs["leaf"].decode()),
    }
    for reason, obj in cases.items():
        with pytest.raises(BundleRefused, match=reason) as info:
            bundle_from_configmap(obj, WHERE)
        assert str(info.value).startswith(WHERE)
    good = bundle_from_configmap(configmap((certs["one"] + certs["two"]).decode()), WHERE)
    assert good.digest == TrustBundle.from_pem(certs["one"] + certs["two"]).digest


def refused(server: DestinationServer) -> float:
    value = server.metrics.registry.get_sample_value(
        "trustmesh_destination_trust_bundle_refreshes_total", {"result": "refused"}
    )
    return value or 0.0


async def test_configmap_changes_reach_subscribers_and_bad_ones_are_refused(
    certs: dict[str, bytes],
) -> None:
    async with emulated_api() as (_emulator, _server, api):
        core = client.CoreV1Api(api)
        await _call(core.create_namespaced_config_map, NS, configmap(certs["one"].decode()))
        options = ServeOptions(
            listen="127.0.0.1:0",
            admin_listen="127.0.0.1:0",
            kubernetes=True,
            resync=timedelta(seconds=5),
        )
        async with (
            DestinationServer(options, kube_api=api) as server,
            DestinationClient(f"127.0.0.1:{server.port}", channels=Channel) as c,
        ):
            watch = c.trust_bundle()
            first = await watch.wait_ready(5)
            assert first.digest == TrustBundle.from_pem(certs["one"]).digest

            both = (certs["one"] + certs["two"]).decode()  # rotation: the anchors overlap
            await _patch(core, both)
            second = await eventually(
                lambda: watch.current.digest != first.digest and watch.current
            )
            assert second.digest == TrustBundle.from_pem(both.encode()).digest

            for bad, reason in (
                ("not a certificate", "no valid PEM certificate"),
                ("", "is empty"),
                (certs["leaf"].decode(), "is not a CA certificate"),
            ):
                before = refused(server)
                await _patch(core, bad)
                await eventually(lambda: refused(server) > before)  # noqa: B023
                assert reason in server.trust_roots.refused
                assert watch.current == second and not watch.stale

            await _patch(core, certs["two"].decode())  # a good one after bad ones is applied
            third = await eventually(
                lambda: watch.current.digest != second.digest and watch.current
            )
            assert third.fingerprints == TrustBundle.from_pem(certs["two"]).fingerprints
            assert server.trust_roots.refused is None


async def test_trust_bundle_file_overrides_the_configmap(
    tmp_path: Path, certs: dict[str, bytes]
) -> None:
    anchors = tmp_path / "anchors.pem"
    anchors.write_bytes(certs["two"])
    async with emulated_api() as (_emulator, _server, api):
        core = client.CoreV1Api(api)
        await _call(core.create_namespaced_config_map, NS, configmap(certs["one"].decode()))
        options = ServeOptions(
            listen="127.0.0.1:0", admin_listen="127.0.0.1:0", kubernetes=True, trust_bundle=anchors
        )
        async with (
            DestinationServer(options, kube_api=api) as server,
            DestinationClient(f"127.0.0.1:{server.port}", channels=Channel) as c,
        ):
            current = await c.trust_bundle().wait_ready(5)
            assert current.digest == TrustBundle.from_pem(certs["two"]).digest
            assert server.trust_roots is None


async def _patch(core: client.CoreV1Api, pem: str) -> None:
    await _call(
        core.patch_namespaced_config_map,
        TRUST_ROOTS_CONFIGMAP,
        NS,
        {"data": {"ca-bundle.crt": pem}},
    )


async def _call(fn: Any, *args: Any) -> Any:
    import asyncio

    return await asyncio.to_thread(fn, *args)


async def test_a_configmap_created_after_start_is_picked_up(certs: dict[str, bytes]) -> None:
    async with emulated_api() as (_emulator, _server, api):
        core = client.CoreV1Api(api)
        options = ServeOptions(listen="127.0.0.1:0", admin_listen="127.0.0.1:0", kubernetes=True)
        async with (
            DestinationServer(options, kube_api=api) as server,
            DestinationClient(
                f"127.0.0.1:{server.port}",
                channels=Channel,
                backoff=Backoff(base=0.05, maximum=0.2),
            ) as c,
        ):
            watch = c.trust_bundle()
            # Until the first list, no source has answered; then the refusal says why.
            await eventually(lambda: "does not exist" in str(watch.error))
            assert "UNAVAILABLE" in str(watch.error) and watch.current is None
            await _call(core.create_namespaced_config_map, NS, configmap(certs["one"].decode()))
            got = await eventually(lambda: watch.current)
            assert got.digest == TrustBundle.from_pem(certs["one"]).digest
