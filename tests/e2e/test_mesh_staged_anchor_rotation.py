"""A whole staged trust-anchor rotation under a live mesh, with 15 s workload certificates so
that the proxies renew several times on the way: stage the new anchor, see every proxy take the
new bundle (``trustmesh check`` passes), activate it, see the identity service issue from the
new issuer and both proxies renew under it, then remove the old anchor. A TCP connection opened
before the rotation stays open through all of it, and new mesh connections work at each step."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from mesh_testkit import (
    HOST,
    MeshKit,
    ProxyPorts,
    echo_session,
    eventually,
    metric,
    roundtrip,
    short_lived_mesh,
)

from pki.certs import utcnow
from pki.rotation import bundle_remove, init_anchor

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

NS = "staged"
ECHO = f"echo.{NS}.svc.cluster.local:7000"
ISSUED = re.compile(r"issued certificate for (\S+) serial=\S+ until \S+ issuer=([0-9a-f]{16})")


@pytest.fixture
def mesh(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[MeshKit, dict[str, ProxyPorts]]]:
    yield from short_lived_mesh(tmp_path_factory.mktemp("staged"), NS)


def _bundle_in_use(admin: str, digest: str) -> bool:
    return metric(admin, "trustmesh_proxy_trust_bundle_info", digest=digest) == 1


def _issuers_since(kit: MeshKit, offset: int) -> dict[str, set[str]]:
    """Identity → the issuers (fingerprint prefixes) that signed its leaves after ``offset``."""
    out: dict[str, set[str]] = {}
    for name, issuer in ISSUED.findall(kit.log("identity")[offset:]):
        out.setdefault(name, set()).add(issuer)
    return out


def _check(kit: MeshKit, *admins: str) -> subprocess.CompletedProcess[str]:
    proxies = [arg for admin in admins for arg in ("--proxy", admin)]
    return subprocess.run(
        [sys.executable, "-m", "trustmesh", "check", "--store", str(kit.home.root), *proxies],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_staged_rotation_end_to_end(mesh: tuple[MeshKit, dict[str, ProxyPorts]]) -> None:
    kit, proxies = mesh
    store = kit.home.store
    admins = (proxies["client-0"].admin_addr, proxies["echo-0"].admin_addr)
    upstream = proxies["client-0"].upstreams[ECHO]
    old = store.load()
    old_issuer = old.require_issuer().certificate.fingerprint[:16]
    identities = {f"{sa}.{NS}.serviceaccount.identity.trustmesh.cluster.local"
                  for sa in ("client", "echo")}  # fmt: skip

    def renewed_by(issuer: str, offset: int) -> bool:
        seen = _issuers_since(kit, offset)
        return all(issuer in seen.get(name, set()) for name in identities)

    with socket.create_connection((HOST, upstream), timeout=10) as held:
        assert roundtrip(held, b"before") == b"before"

        # 1. Stage: every proxy takes the two-anchor bundle; renewals stay under the old issuer.
        staged = init_anchor(store, now=utcnow(), stage=True)
        assert staged.next_anchor is not None
        eventually(
            lambda: all(_bundle_in_use(a, staged.require_bundle().digest) for a in admins),
            20,
            "both proxies using the bundle with the staged anchor",
        )
        checked = _check(kit, *admins)
        assert checked.returncode == 0 and "‼" not in checked.stdout, checked.stdout
        mark = len(kit.log("identity"))
        eventually(lambda: renewed_by(old_issuer, mark), 30, "renewals under the old issuer")
        assert _issuers_since(kit, mark).keys() <= identities
        assert all(s == {old_issuer} for s in _issuers_since(kit, mark).values())

        # 2. Activate, by the CLI, gated on both proxies' admin endpoints and on the identity
        #    service's reports (both renewed above, holding the new bundle): the identity
        #    service reloads and both proxies renew under the new issuer.
        activated = subprocess.run(
            [sys.executable, "-m", "trustmesh", "pki", "--store", str(kit.home.root),
             "anchor", "activate", "--proxy", admins[0], "--proxy", admins[1],
             "--identity", f"{HOST}:{kit.id_admin}", "-o", "json"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert activated.returncode == 0, activated.stderr
        assert activated.stderr == ""  # no warning: every identity reports its bundle
        active = store.load()
        new_issuer = active.require_issuer().certificate.fingerprint[:16]
        assert new_issuer != old_issuer and active.anchor == staged.next_anchor
        mark = len(kit.log("identity"))
        eventually(lambda: renewed_by(new_issuer, mark), 40, "renewals under the new issuer")
        assert roundtrip(held, b"after activation") == b"after activation"
        assert echo_session(upstream, b"new connection") == b"new connection"

        # 3. Once no leaf of the old issuer is left (15 s lives, renewed above), the old anchor
        #    goes; the proxies take the one-anchor bundle and the mesh keeps working.
        # (force: the old issuer is still valid, but every leaf it signed has been replaced)
        done = bundle_remove(store, old.anchor.fingerprint, now=utcnow(), force=True)  # type: ignore[union-attr]
        assert done.require_bundle().fingerprints == (staged.next_anchor.fingerprint,)
        eventually(
            lambda: all(_bundle_in_use(a, done.require_bundle().digest) for a in admins),
            20,
            "both proxies using the bundle without the old anchor",
        )
        assert roundtrip(held, b"after removal") == b"after removal"
        assert echo_session(upstream, b"after removal") == b"after removal"
        held.shutdown(socket.SHUT_WR)
        assert held.recv(10) == b""
    for admin in admins:
        assert metric(admin, "identity_cert_refreshes_total", result="error") == 0
        # every mesh handshake, either side, at every step, succeeded
        assert metric(admin, "tls_handshakes_total") == metric(
            admin, "tls_handshakes_total", result="ok"
        )
