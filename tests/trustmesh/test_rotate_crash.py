"""SIGKILL a real ``trustmesh rotate`` at every step of a rotation, and at random instants:
the store must afterwards be the old or the new version, loadable, never a mix."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from pki.certs import utcnow
from pki.rotation import init_anchor
from pki.store import ANCHOR, ANCHOR_KEY, BUNDLE, ISSUER, ISSUER_KEY, FileStore
from pki.verify import verify_chain

TRUSTMESH = [sys.executable, "-m", "trustmesh"]
CRASH_POINTS = [
    *(f"write:{n}" for n in sorted([ANCHOR, ANCHOR_KEY, BUNDLE, ISSUER, ISSUER_KEY])),
    "write:meta",
    "rename",
    "flip",
    "flipped",
]


def _due_store(make_store) -> FileStore:
    # Issuer created 40h ago with a 48h life: due now (past two thirds).
    return make_store(utcnow() - timedelta(hours=40))


def _rotate(store: FileStore, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*TRUSTMESH, "rotate", "--store", str(store.root), "-o", "json"],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _assert_consistent(store: FileStore, old_version: int, old_fp: str) -> str:
    state = store.load()  # raises StoreCorrupt on any mix
    assert state.version in (old_version, old_version + 1)
    issuer = state.require_issuer()
    assert issuer.key.matches(issuer.certificate.x509.public_key())
    if state.version == old_version:
        assert issuer.certificate.fingerprint == old_fp
        return "old"
    assert issuer.certificate.fingerprint != old_fp
    return "new"


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_at_every_write_step(make_store, point):
    store = _due_store(make_store)
    old_version, old_fp = store.current_version(), store.issuer().certificate.fingerprint
    proc = _rotate(store, TRUSTMESH_CRASH_AT=point)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"rotate did not reach crash point {point}"
    outcome = _assert_consistent(store, old_version, old_fp)
    assert outcome == ("new" if point == "flipped" else "old")
    # The next run recovers: cleans the partial write and renews (or finds nothing due).
    proc = _rotate(store)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert _assert_consistent(store, old_version, old_fp) == "new"
    assert not [p for p in store.versions_dir.iterdir() if p.name.startswith(".tmp-")]


def test_sigkill_at_random_instants(make_store):
    rng = random.Random(20261121)
    outcomes = []
    for _ in range(12):
        store = _due_store(make_store)
        old_version, old_fp = store.current_version(), store.issuer().certificate.fingerprint
        proc = _rotate(store)
        time.sleep(rng.uniform(0.05, 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        outcomes.append(_assert_consistent(store, old_version, old_fp))
        # Each iteration gets a fresh store directory.
        store.root.rename(Path(str(store.root) + f"-{len(outcomes)}"))
    assert set(outcomes) <= {"old", "new"}


@pytest.mark.parametrize(
    ("command", "point"),
    [
        (("anchor", "create", "--rotate"), "write:bundle.pem"),
        (("anchor", "create", "--rotate"), "flip"),
        (("anchor", "create", "--rotate"), "flipped"),
        (("issuer", "rotate"), "write:issuer.key"),
        (("issuer", "rotate"), "flip"),
    ],
)
def test_sigkill_during_pki_anchor_and_issuer_rotation(make_store, command, point):
    # The operator's commands write through the same store: killed at any step, the old
    # anchor stays in the bundle, the issuer still chains to a bundled anchor, and a re-run
    # completes.
    store = make_store(utcnow() - timedelta(hours=1))
    before = store.load()
    old_anchors = set(before.require_bundle().fingerprints)
    args = [*TRUSTMESH, "pki", "--store", str(store.root), *command]
    env = {**os.environ, "TRUSTMESH_CRASH_AT": point}
    crashed = subprocess.run(args, env=env, capture_output=True, timeout=60)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()
    for attempt in ("after the crash", "after the re-run"):
        state = store.load()
        bundle = state.require_bundle()
        assert old_anchors <= set(bundle.fingerprints), attempt
        assert state.anchor_key is not None and state.anchor is not None
        assert state.anchor_key.matches(state.anchor.x509.public_key()), attempt
        issuer = state.require_issuer()
        assert issuer.key.matches(issuer.certificate.x509.public_key()), attempt
        verify_chain(issuer.certificate, issuer.chain, bundle, at=utcnow())
        if attempt == "after the crash":
            assert state.version == before.version + (point == "flipped")
            rerun = subprocess.run(args, capture_output=True, timeout=60)
            assert rerun.returncode == 0, rerun.stderr.decode()
    assert not [p for p in store.versions_dir.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("point", ["write:anchor.key", "write:issuer.pem", "write:meta", "flip"])
def test_sigkill_during_staged_anchor_activation(make_store, point):
    # Activation changes the signing anchor and the issuer in one version: killed at any step
    # before the flip, the store is still staged (the old anchor signing, the old issuer
    # chained to it), never a new anchor with the old issuer. A re-run completes.
    store = make_store(utcnow() - timedelta(hours=1))
    staged = init_anchor(store, now=utcnow(), stage=True).next_anchor
    old_anchor = store.load().anchor
    args = [*TRUSTMESH, "pki", "--store", str(store.root), "anchor", "activate"]
    crashed = subprocess.run(
        args, env={**os.environ, "TRUSTMESH_CRASH_AT": point}, capture_output=True, timeout=60
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()
    state = store.load()
    assert state.anchor == old_anchor and state.next_anchor == staged  # still staged
    issuer = state.require_issuer()
    path = verify_chain(issuer.certificate, issuer.chain, state.require_bundle(), at=utcnow())
    assert path[-1] == old_anchor
    rerun = subprocess.run(args, capture_output=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr.decode()
    state = store.load()
    issuer = state.require_issuer()
    path = verify_chain(issuer.certificate, issuer.chain, state.require_bundle(), at=utcnow())
    assert state.anchor == staged and state.next_anchor is None and path[-1] == staged
    assert not [p for p in store.versions_dir.iterdir() if p.name.startswith(".tmp-")]
