"""Planning ``up`` from a mesh file, the demo mesh, the demo's answer check, the local home."""

from __future__ import annotations

import itertools
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from destination.inbound import resolve_inbound
from destination.meshfile import load_mesh_text
from destination.resources import MeshSettings
from identity.validators import service_account_username
from pki import tokens
from pki.errors import StoreCorrupt, StoreError
from trustmesh.up.demo import check_chain, demo_mesh
from trustmesh.up.home import (
    Home,
    HomeInUse,
    HomeUnusable,
    RunningMesh,
    ensure_pki,
    write_token,
)
from trustmesh.up.plan import ControlPlane, PlanError, plan_mesh, proxy_args
from trustmesh.up.sidecar_config import parse_upstream

WORKLOAD = """\
apiVersion: trustmesh.io/v1alpha1
kind: Workload
metadata:
  name: web-0
  namespace: shop
  annotations: %s
spec: {serviceAccount: web, address: 127.0.0.1, %s ports: [{name: http, port: 18080}]}
"""


def _plan(annotations: str, inbound: str = "inboundProxyPort: 14143,"):
    state = load_mesh_text(WORKLOAD % (annotations, inbound))
    return plan_mesh(state, itertools.count(30000))


def test_plan_reads_the_workload_and_its_up_annotations() -> None:
    (plan,) = _plan(
        "{up.trustmesh.io/command: '{python} -m app --port 18080', "
        "up.trustmesh.io/upstreams: '127.0.0.1:24001=api.shop.svc.cluster.local:8080', "
        "up.trustmesh.io/admin-port: '24191'}"
    )
    assert plan.key == "shop/web-0" and plan.meshed and plan.service_account == "web"
    assert plan.command == (sys.executable, "-m", "app", "--port", "18080")
    assert plan.upstreams == (("127.0.0.1", 24001, "api.shop.svc.cluster.local:8080"),)
    assert (plan.admin_port, plan.outbound_port) == (24191, 30000)
    args = proxy_args(
        plan,
        ControlPlane("127.0.0.1:1", "127.0.0.1:2"),
        token_file="t",
        anchors="a",
        kex="hybrid-required",
    )
    joined = " ".join(args)
    assert "--inbound-listen 127.0.0.1:14143" in joined and "--app-port 18080" in joined
    assert "--upstream 127.0.0.1:24001=api.shop.svc.cluster.local:8080" in joined


@pytest.mark.parametrize(
    ("annotations", "inbound", "message"),
    [
        (
            "{up.trustmesh.io/upstreams: 'nonsense'}",
            "inboundProxyPort: 14143,",
            "LOCAL_ADDR=SERVICE",
        ),
        ("{up.trustmesh.io/upstreams: '127.0.0.1:1=a'}", "", "need a proxy"),
        ("{up.trustmesh.io/admin-port: 'x'}", "inboundProxyPort: 14143,", "not a port number"),
        # str.isdigit() takes these; int() does not (a ValueError escaped before)
        ("{up.trustmesh.io/admin-port: '\u00b2'}", "inboundProxyPort: 14143,", "not a port number"),
        (
            f"{{up.trustmesh.io/outbound-port: '{'1' * 5000}'}}",
            "inboundProxyPort: 14143,",
            "not a port number",
        ),
        ("{up.trustmesh.io/command: 'a \"b'}", "inboundProxyPort: 14143,", "does not parse"),
    ],
)
def test_bad_annotations_name_the_workload(annotations: str, inbound: str, message: str) -> None:
    with pytest.raises(PlanError, match=message) as e:
        _plan(annotations, inbound)
    assert "shop/web-0" in str(e.value)


def test_parse_upstream() -> None:
    assert parse_upstream("[::1]:80=web") == (("::1", 80), "web")
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_upstream("localhost=web")


def test_demo_mesh_is_a_valid_mesh_with_caller_only_policy() -> None:
    state = load_mesh_text(demo_mesh(itertools.count(20000)))
    plans = {p.key: p for p in plan_mesh(state, itertools.count(40000))}
    assert set(plans) == {
        f"demo/{n}" for n in ("web-0", "api-0", "api-1", "quote-0", "echo-0", "traffic-0")
    }
    assert not plans["demo/traffic-0"].command and len(plans["demo/traffic-0"].upstreams) == 2
    settings = MeshSettings()

    def permits(workload: str, caller: str) -> bool:
        port = plans[f"demo/{workload}"].app_ports[0]
        policy = resolve_inbound(state, settings, "demo", workload, port)
        ident = f"{caller}.demo.serviceaccount.identity.trustmesh.cluster.local"
        return policy.permits("127.0.0.1", True, ident)

    assert permits("web-0", "traffic") and not permits("web-0", "api")
    assert permits("api-1", "web") and not permits("api-1", "traffic")
    assert permits("quote-0", "api") and not permits("quote-0", "web")
    assert permits("echo-0", "traffic") and not permits("echo-0", "web")


def _id(sa: str) -> str:
    return f"{sa}.demo.serviceaccount.identity.trustmesh.cluster.local"


def test_check_chain() -> None:
    chain = {
        "service": "web",
        "client": _id("traffic"),
        "next": {
            "service": "api-1",
            "client": _id("web"),
            "next": {"service": "quote", "client": _id("api")},
        },
    }
    good = json.dumps(chain)
    assert check_chain(good.encode()) == "api-1"
    with pytest.raises(ValueError, match="quote hop is missing"):
        check_chain(
            good.replace(', "next": {"service": "quote"', ', "x": {"service": "quote"').encode()
        )
    with pytest.raises(ValueError, match="saw client"):
        check_chain(good.replace(_id("web"), _id("rogue")).encode())


def test_home_creates_the_pki_once_and_signs_private_tokens(tmp_path: Path, t0) -> None:
    home = Home(tmp_path / "home")
    assert ensure_pki(home, now=t0) == "created"
    assert ensure_pki(home, now=t0 + timedelta(hours=1)) == "existing"
    assert ensure_pki(home, now=t0 + timedelta(days=3)) == "issuer replaced"  # 48 h issuer
    assert home.anchors.read_bytes() == home.store.trust_bundle().pem()
    path = write_token(home, "shop", "web", now=t0)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    key = tokens.token_signing_key(home.store, now=t0)
    claims = tokens.verify_token(path.read_bytes().strip(), key, audience="identity.l5d.io", now=t0)
    assert claims.subject == service_account_username("shop", "web")


def test_home_never_mints_a_new_anchor_over_an_existing_store(tmp_path: Path, t0) -> None:
    home = Home(tmp_path / "home")
    ensure_pki(home, now=t0)
    anchor = home.store.load().anchor
    assert anchor is not None
    versions = home.store.versions()
    (home.root / "current").unlink()  # e.g. a restore that missed the symlink
    with pytest.raises(StoreCorrupt, match="no 'current' link; refusing"):
        ensure_pki(home, now=t0)
    assert home.store.versions() == versions  # the archive is untouched
    (home.root / "current").symlink_to(f"versions/{versions[-1]:06d}")
    assert ensure_pki(home, now=t0) == "existing"
    assert home.store.load().anchor == anchor


def test_home_lock_refuses_a_second_up_naming_the_holder(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    held = rf"another trustmesh up \(pid {os.getpid()}\)"
    with home.run_lock(), pytest.raises(HomeInUse, match=held), home.run_lock():
        pass
    with home.run_lock():  # released with the first holder
        pass


_READY = {
    "control_plane": {"admin": {"identity": "127.0.0.1:1001", "destination": "127.0.0.1:1002"}},
    "workloads": [
        {"workload": "shop/web-0", "admin": "127.0.0.1:1003"},
        {"workload": "shop/db-0", "admin": None},  # unmeshed: no proxy
    ],
}


def test_home_publishes_the_running_mesh_for_check(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    assert home.running() is None  # nothing published
    home.run_dir.mkdir(parents=True)
    home.publish(_READY)
    assert home.running() == RunningMesh(
        os.getpid(), "127.0.0.1:1001", "127.0.0.1:1002", {"127.0.0.1:1003": "shop/web-0"}
    )
    home.unpublish()
    assert home.running() is None
    home.unpublish()  # twice is fine


def test_home_ignores_a_mesh_published_by_a_process_that_has_ended(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.run_dir.mkdir(parents=True)
    home.publish(_READY)
    data = json.loads(home.published.read_bytes())
    # An 'up' killed outright left it, and its pid is now another process's (this one's, with
    # another start time) or nobody's.
    for pid, start in ((os.getpid(), data["process_start"] + 1), (2**22 + 1, 1), (2**22 + 1, None)):
        home.published.write_text(json.dumps({**data, "pid": pid, "process_start": start}))
        assert home.running() is None
    for junk in ("", "{", "[]", '{"pid": "1"}', json.dumps({**data, "workloads": [1]})):
        home.published.write_text(junk)
        assert home.running() is None


def test_a_home_that_cannot_be_created_is_named(tmp_path: Path) -> None:
    # It was a bare "[Errno 20] Not a directory: '.../up'" from the CLI.
    (tmp_path / "file").write_text("")
    home = Home(tmp_path / "file")
    said = r"cannot use .*/file as the trustmesh up home: .*/file/up: Not a directory"
    with pytest.raises(HomeUnusable, match=said), home.run_lock():
        pass


def test_home_with_an_expired_anchor_says_so(tmp_path: Path, t0) -> None:
    home = Home(tmp_path / "home")
    ensure_pki(home, now=t0)
    # It said 'the issuer chain expires at ..., so no certificate can be issued'.
    with pytest.raises(StoreError, match=r"the trust anchor in .* is not valid at .*--rotate"):
        ensure_pki(home, now=t0 + timedelta(days=400))
