"""Rotation: the state table, the pure plan at explicit times, and the store operations."""

from __future__ import annotations

import re
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from pki_testkit import T0, build_chain, hand_built_issuer

from pki.certs import (
    DEFAULT_CLOCK_SKEW,
    DEFAULT_ISSUER_LIFETIME,
    Credential,
    create_issuer,
    issuer_certificate,
)
from pki.csr import validate_ca_csr
from pki.errors import (
    BundleError,
    CertificateParseError,
    PKIError,
    StoreCorrupt,
    StoreError,
    StoreNotInitialized,
)
from pki.keys import KeyAlgorithm, PrivateKey
from pki.renewal import RenewalAction, RenewalPolicy
from pki.rotation import (
    TRANSITIONS,
    AnchorInUse,
    AnchorStatus,
    Event,
    InvalidTransition,
    Stage,
    activate_anchor,
    advance,
    anchor_in_use,
    bundle_add,
    bundle_remove,
    import_issuer,
    import_issuer_certificate,
    init_anchor,
    issue_issuer,
    plan,
    request_issuer,
    rotate_if_due,
)
from pki.store import (
    ANCHOR_KEY,
    ISSUER_SETTINGS,
    NEXT_ANCHOR,
    NEXT_ANCHOR_KEY,
    PENDING_ISSUER_KEY,
    FileStore,
)
from pki.verify import verify_chain


def test_every_stage_event_pair() -> None:
    for stage in Stage:
        for event in Event:
            if (stage, event) in TRANSITIONS:
                assert advance(stage, event) is TRANSITIONS[(stage, event)]
            else:
                with pytest.raises(InvalidTransition, match=event.value):
                    advance(stage, event)


def test_happy_paths_through_the_table() -> None:
    stage = advance(Stage.START, Event.PLAN_OK)
    assert advance(advance(stage, Event.DUE), Event.COMMITTED) is Stage.DONE
    assert advance(advance(stage, Event.NOT_DUE), Event.HUMAN_ACTION) is Stage.NEEDS_HUMAN


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    fs = FileStore(tmp_path / "s")
    init_anchor(fs, now=T0, lifetime=timedelta(days=365))
    issue_issuer(fs, now=T0, lifetime=timedelta(hours=48))
    return fs


def test_plan_at_explicit_times(store: FileStore) -> None:
    state = store.load()
    policy = RenewalPolicy()  # renew with a third of the life left: at 32h of 48h
    early = plan(state, policy, T0 + timedelta(hours=31))
    assert not early.renew_issuer and early.issuer.action is RenewalAction.WAIT
    assert early.anchor_status is AnchorStatus.OK and early.human_actions == ()
    due = plan(state, policy, T0 + timedelta(hours=33))
    assert due.renew_issuer and due.issuer.action is RenewalAction.RENEW_NOW
    expired = plan(state, policy, T0 + timedelta(hours=49))
    assert expired.renew_issuer and expired.issuer.action is RenewalAction.EXPIRED


def test_plan_anchor_warning_and_expiry(store: FileStore) -> None:
    state = store.load()
    policy = RenewalPolicy()
    anchor_end = state.anchor.not_after  # type: ignore[union-attr]
    warn = plan(state, policy, anchor_end - timedelta(days=59))
    assert warn.anchor_status is AnchorStatus.WARNING
    assert any("within 60 days" in a for a in warn.human_actions)
    short = plan(state, policy, anchor_end - timedelta(hours=10))
    assert short.renewed_issuer_not_after == anchor_end
    assert any("cut short" in a for a in short.human_actions)
    gone = plan(state, policy, anchor_end + timedelta(seconds=1))
    assert gone.anchor_status is AnchorStatus.EXPIRED and not gone.renew_issuer


def test_plan_judges_a_renewal_by_the_lifetime_asked_for(tmp_path: Path) -> None:
    # The current issuer was cut to the anchor's last 30 h; the plan speaks of the 48 h a
    # renewal asks for (issuer.json), and that it would be cut short again.
    fs = FileStore(tmp_path / "s")
    init_anchor(fs, now=T0, lifetime=timedelta(hours=40))
    state = issue_issuer(fs, now=T0 + timedelta(hours=10), lifetime=timedelta(hours=48))
    assert state.require_issuer().expires == state.anchor.not_after  # type: ignore[union-attr]
    later = plan(state, RenewalPolicy(), T0 + timedelta(hours=11))
    assert later.issuer_lifetime == timedelta(hours=48)
    assert later.renewed_issuer_not_after == state.anchor.not_after  # type: ignore[union-attr]
    assert any("cut short" in a for a in later.human_actions)


def test_rotate_if_due(store: FileStore) -> None:
    policy = RenewalPolicy()
    p, new = rotate_if_due(store, policy, now=T0 + timedelta(hours=1))
    assert new is None and not p.renew_issuer
    p, new = rotate_if_due(store, policy, now=T0 + timedelta(hours=40), dry_run=True)
    assert p.renew_issuer and new is None and store.load().version == 2
    before = store.load().require_issuer()
    p, new = rotate_if_due(store, policy, now=T0 + timedelta(hours=40))
    assert new is not None and new.version == 3
    after = new.require_issuer()
    assert after.certificate != before.certificate
    assert after.certificate.key_algorithm is before.certificate.key_algorithm
    assert after.certificate.lifetime == before.certificate.lifetime
    # idempotent: a second run at the same time has nothing to do
    assert rotate_if_due(store, policy, now=T0 + timedelta(hours=40))[1] is None


def test_init_anchor_twice_and_rotate(store: FileStore) -> None:
    with pytest.raises(StoreError, match="--rotate"):
        init_anchor(store, now=T0)
    state = init_anchor(store, now=T0, rotate=True, algorithm=KeyAlgorithm.ML_DSA_65)
    bundle = state.require_bundle()
    assert len(bundle.anchors) == 2 and state.anchor == bundle.anchors[1]
    assert state.anchor.key_algorithm is KeyAlgorithm.ML_DSA_65  # type: ignore[union-attr]


def test_bundle_operations_keep_the_issuer_trusted(store: FileStore) -> None:
    old = store.load().require_bundle().anchors[0]
    new_anchor = init_anchor(store, now=T0, rotate=True).anchor
    assert new_anchor is not None
    with pytest.raises(BundleError, match="signs the current issuer"):
        bundle_remove(store, new_anchor.fingerprint, now=T0)
    with pytest.raises(BundleError, match="issuer rotate"):
        bundle_remove(store, old.fingerprint, now=T0)
    state = issue_issuer(store, now=T0, reason="issuer under the new anchor")
    # The issuer replaced is still valid, and so may be the certificates it signed.
    with pytest.raises(BundleError, match=r"issuer [0-9a-f]{16} \(store version \d+\) chains"):
        bundle_remove(store, old.fingerprint[:12], now=T0)
    state = bundle_remove(store, old.fingerprint[:12], now=T0, force=True)
    issuer = state.require_issuer()
    path = verify_chain(issuer.certificate, issuer.chain, state.require_bundle(), at=T0)
    assert path[-1] == new_anchor


def _anchor_of(state) -> object:  # the bundle anchor the issuer chains to
    issuer = state.require_issuer()
    at = issuer.certificate.not_before + timedelta(minutes=1)
    return verify_chain(issuer.certificate, issuer.chain, state.require_bundle(), at=at)[-1]


def test_staged_rotation_signs_nothing_until_activated(store: FileStore) -> None:
    before = store.load()
    old = before.anchor
    staged = init_anchor(store, now=T0, stage=True, algorithm=KeyAlgorithm.ML_DSA_65)
    new = staged.next_anchor
    assert new is not None and staged.next_anchor_key is not None
    # step 1: the new anchor is trusted, the old one still signs
    assert staged.require_bundle().fingerprints == (old.fingerprint, new.fingerprint)  # type: ignore[union-attr]
    assert staged.anchor == old
    assert staged.require_issuer().certificate == before.require_issuer().certificate
    renewed = rotate_if_due(store, RenewalPolicy(), now=T0 + timedelta(hours=40))[1]
    assert renewed is not None and _anchor_of(renewed) == old  # the cron job keeps to the old
    assert renewed.next_anchor == new  # and carries the staged anchor along
    # step 2: the staged anchor signs, with a new issuer of the same shape, in one version
    active = activate_anchor(store, now=T0 + timedelta(hours=41))
    assert active.version == renewed.version + 1
    assert active.anchor == new and active.next_anchor is None and active.next_anchor_key is None
    assert active.anchor_key is not None and active.anchor_key.matches(new.x509.public_key())
    assert NEXT_ANCHOR not in active.files and NEXT_ANCHOR_KEY not in active.files
    issuer = active.require_issuer()
    assert _anchor_of(active) == new and issuer.certificate != renewed.require_issuer().certificate
    assert issuer.certificate.key_algorithm is KeyAlgorithm.ECDSA_P256
    assert issuer.certificate.lifetime == before.require_issuer().certificate.lifetime
    assert old in active.require_bundle()  # still trusted for the leaves it signed
    # step 3: the old anchor can go once the last issuer under it, renewed at 40 h, has
    # expired (and every certificate it signed with it)
    last = renewed.require_issuer().certificate
    until = last.not_after.isoformat()
    with pytest.raises(
        BundleError, match=f"{last.fingerprint[:16]} .* valid until {re.escape(until)}"
    ):
        bundle_remove(store, old.fingerprint, now=last.not_after - timedelta(seconds=1))  # type: ignore[union-attr]
    done = bundle_remove(store, old.fingerprint, now=last.not_after + timedelta(seconds=1))  # type: ignore[union-attr]
    assert done.require_bundle().fingerprints == (new.fingerprint,)


def test_staged_rotation_refusals(store: FileStore) -> None:
    with pytest.raises(StoreError, match="no anchor is staged"):
        activate_anchor(store, now=T0)
    staged = init_anchor(store, now=T0, stage=True).next_anchor
    assert staged is not None
    version = store.load().version
    with pytest.raises(StoreError, match="already staged; activate it"):
        init_anchor(store, now=T0, stage=True)
    with pytest.raises(StoreError, match="already staged"):
        init_anchor(store, now=T0, rotate=True)  # would make another anchor sign at once
    with pytest.raises(StoreError, match="not valid at"):
        activate_anchor(store, now=staged.not_after + timedelta(seconds=1))
    with store.lock():
        store.commit({NEXT_ANCHOR_KEY: None}, reason="staged key taken offline", now=T0)
    with pytest.raises(StoreError, match="private key is not in the store"):
        activate_anchor(store, now=T0)
    assert store.load().anchor != staged and store.load().version == version + 1


def test_a_staged_anchor_can_be_discarded(store: FileStore) -> None:
    before = store.load()
    staged = init_anchor(store, now=T0, stage=True).next_anchor
    assert staged is not None
    state = bundle_remove(store, staged.fingerprint, now=T0)
    assert state.next_anchor is None and NEXT_ANCHOR_KEY not in state.files
    assert state.require_bundle() == before.require_bundle() and state.anchor == before.anchor
    assert init_anchor(store, now=T0, stage=True).next_anchor != staged  # a fresh one can follow


def test_stage_needs_an_anchor_to_rotate_from(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s")
    with pytest.raises(StoreNotInitialized, match="no TrustMesh store"):
        init_anchor(store, now=T0, stage=True)
    foreign = build_chain(KeyAlgorithm.ECDSA_P256).anchor.certificate
    with store.lock():  # a store holding a bundle of foreign anchors only
        store.commit({"bundle.pem": foreign.pem}, reason="bundle only", now=T0)
    with pytest.raises(StoreError, match="no trust anchor to rotate from"):
        init_anchor(store, now=T0, stage=True)


def test_a_staged_anchor_outside_the_bundle_is_refused(store: FileStore) -> None:
    foreign = build_chain(KeyAlgorithm.ECDSA_P256).anchor
    version = store.load().version
    with store.lock(), pytest.raises(StoreCorrupt, match="not in its trust bundle"):
        store.commit({NEXT_ANCHOR: foreign.certificate.pem}, reason="broken", now=T0)
    other = build_chain(KeyAlgorithm.ECDSA_P256).anchor
    with store.lock(), pytest.raises(StoreCorrupt, match="is not the key of"):
        store.commit(
            {
                "bundle.pem": store.load().require_bundle().add(foreign.certificate).pem(),
                NEXT_ANCHOR: foreign.certificate.pem,
                NEXT_ANCHOR_KEY: other.key.to_pem(),
            },
            reason="broken",
            now=T0,
        )
    assert store.load().version == version  # current never moved


def test_plan_points_at_the_staged_anchor(store: FileStore) -> None:
    anchor_end = store.load().anchor.not_after  # type: ignore[union-attr]
    warn = plan(store.load(), RenewalPolicy(), anchor_end - timedelta(days=59))
    assert any("anchor create --staged" in a for a in warn.human_actions)
    staged = init_anchor(store, now=T0, stage=True).next_anchor
    assert staged is not None
    warn = plan(store.load(), RenewalPolicy(), anchor_end - timedelta(days=59))
    assert any(
        f"anchor {staged.fingerprint[:16]} is staged" in a and "pki anchor activate" in a
        for a in warn.human_actions
    )


def test_bundle_add(store: FileStore) -> None:
    foreign = build_chain(KeyAlgorithm.ECDSA_P256)
    state = bundle_add(store, foreign.anchor.certificate.pem, now=T0)
    assert foreign.anchor.certificate in state.require_bundle()
    with pytest.raises(BundleError, match="not a CA"):
        bundle_add(store, foreign.leaf.certificate.pem, now=T0)
    with pytest.raises(CertificateParseError):
        bundle_add(store, b"junk", now=T0)


def test_issuer_needs_the_anchor_key(store: FileStore) -> None:
    from pki.store import ANCHOR_KEY

    with store.lock():
        store.commit({ANCHOR_KEY: None}, reason="anchor key taken offline", now=T0)
    with pytest.raises(StoreError, match="offline"):
        issue_issuer(store, now=T0)


def _self_signed_ca(key: object, *, serial: int, not_before: datetime, days: int = 30) -> bytes:
    from cryptography.hazmat.primitives import hashes, serialization

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "foreign anchor")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_before + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _openssl_ca(tmp_path: Path, *, serial: int) -> bytes:
    # cryptography's builder refuses serials <= 0 (RFC 5280), but other tools still write them.
    out = tmp_path / f"serial{serial}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(tmp_path / "k.pem"), "-out", str(out), "-days", "30000",
         "-subj", "/CN=foreign", "-set_serial", str(serial),
         "-addext", "basicConstraints=critical,CA:TRUE"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return out.read_bytes()


@pytest.mark.filterwarnings("ignore:Parsed a serial number")
def test_bundle_add_refuses_weak_expired_and_invalid_serial_anchors(
    store: FileStore, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    p256 = ec.generate_private_key(ec.SECP256R1())
    before = store.current_version()
    refused = [
        (_openssl_ca(tmp_path, serial=-5), "serial number -5"),
        (_openssl_ca(tmp_path, serial=0), "serial number 0"),
        (
            _self_signed_ca(
                rsa.generate_private_key(public_exponent=65537, key_size=1024),
                serial=7,
                not_before=T0,
            ),
            "RSA-1024",
        ),
        (_self_signed_ca(p256, serial=7, not_before=T0 - timedelta(days=60)), "expired"),
    ]
    for pem, reason in refused:
        with pytest.raises(BundleError, match=reason):
            bundle_add(store, pem, now=T0)
    assert store.current_version() == before  # nothing written
    ok = _self_signed_ca(
        rsa.generate_private_key(public_exponent=65537, key_size=2048), serial=7, not_before=T0
    )
    assert len(bundle_add(store, ok, now=T0).require_bundle().anchors) == 2


def test_operations_on_a_missing_store_create_nothing(tmp_path: Path) -> None:
    missing = FileStore(tmp_path / "typo" / "store")
    operations = [
        lambda: issue_issuer(missing, now=T0),
        lambda: rotate_if_due(missing, RenewalPolicy(), now=T0),
        lambda: bundle_add(
            missing, build_chain(KeyAlgorithm.ECDSA_P256).anchor.certificate.pem, now=T0
        ),
        lambda: bundle_remove(missing, "00", now=T0),
        lambda: init_anchor(missing, now=T0, stage=True),
        lambda: activate_anchor(missing, now=T0),
    ]
    for operation in operations:
        with pytest.raises(StoreNotInitialized, match=str(missing.root)):
            operation()
        assert not (tmp_path / "typo").exists()


def test_an_issuer_cut_short_by_its_anchor_does_not_shorten_the_next_ones(tmp_path: Path) -> None:
    # A 72 h issuer made 30 h before its anchor expires is cut to those 30 h. The new issuer
    # that activating the next anchor makes, and every renewal after, must be 72 h again: the
    # certificate's window used to be taken as the lifetime, so 30 h stuck for good.
    fs = FileStore(tmp_path / "s")
    init_anchor(fs, now=T0, lifetime=timedelta(hours=30))
    cut = issue_issuer(fs, now=T0, lifetime=timedelta(hours=72))
    assert cut.require_issuer().expires == cut.anchor.not_after  # type: ignore[union-attr]
    assert cut.issuer_lifetime == timedelta(hours=72)
    assert ISSUER_SETTINGS in cut.files
    init_anchor(fs, now=T0 + timedelta(hours=1), stage=True, lifetime=timedelta(days=365))
    active = activate_anchor(fs, now=T0 + timedelta(hours=2))
    full = timedelta(hours=72) + 2 * DEFAULT_CLOCK_SKEW
    assert active.require_issuer().certificate.lifetime == full
    renewed = issue_issuer(fs, now=T0 + timedelta(hours=3))
    assert renewed.require_issuer().certificate.lifetime == full
    # the one-step rotation: the cron job's renewal under the new anchor is full length too
    init_anchor(fs, now=T0 + timedelta(hours=4), rotate=True, lifetime=timedelta(days=365))
    after = rotate_if_due(fs, RenewalPolicy(), now=T0 + timedelta(hours=60))[1]
    assert after is not None and after.require_issuer().certificate.lifetime == full


def test_stores_without_issuer_settings_infer_the_lifetime(tmp_path: Path) -> None:
    # Stores written before issuer.json: the issuer certificate's own window, unless its
    # anchor cut it short, in which case the 48 h default.
    fs = FileStore(tmp_path / "s")
    init_anchor(fs, now=T0, lifetime=timedelta(days=365))
    issue_issuer(fs, now=T0, lifetime=timedelta(hours=72))
    with fs.lock():
        legacy = fs.commit({ISSUER_SETTINGS: None}, reason="as an older release wrote it", now=T0)
    assert legacy.issuer_lifetime is None
    renewed = issue_issuer(fs, now=T0 + timedelta(hours=50))
    assert renewed.issuer_lifetime == timedelta(hours=72)
    fs2 = FileStore(tmp_path / "s2")
    init_anchor(fs2, now=T0, lifetime=timedelta(hours=10))
    issue_issuer(fs2, now=T0, lifetime=timedelta(hours=72))  # cut to ~10 h
    with fs2.lock():
        fs2.commit({ISSUER_SETTINGS: None}, reason="as an older release wrote it", now=T0)
    init_anchor(fs2, now=T0 + timedelta(hours=1), stage=True)
    active = activate_anchor(fs2, now=T0 + timedelta(hours=2))
    assert active.issuer_lifetime == DEFAULT_ISSUER_LIFETIME


@pytest.mark.parametrize(
    "data",
    [b"not json", b"[]", b'{"lifetime": 3600}', b'{"lifetime_seconds": -5}',
     b'{"lifetime_seconds": 1.5}', b'{"lifetime_seconds": true}',
     b'{"lifetime_seconds": 99999999999999}'],
)  # fmt: skip
def test_a_bad_issuer_settings_file_is_refused_and_nothing_moves(
    store: FileStore, data: bytes
) -> None:
    before = store.load()
    with store.lock(), pytest.raises(StoreCorrupt, match=r"issuer\.json"):
        store.commit({ISSUER_SETTINGS: data}, reason="bad", now=T0)
    assert store.load().version == before.version


def _offline_store(tmp_path: Path) -> tuple[FileStore, Credential]:
    """A store whose anchor key is kept outside it, and that anchor as a credential."""
    fs = FileStore(tmp_path / "offline")
    key = PrivateKey.generate()
    state = init_anchor(fs, now=T0, key=key, store_key=False)
    assert state.anchor is not None and state.anchor_key is None
    assert ANCHOR_KEY not in state.files
    return fs, Credential(state.anchor, key)


def test_an_issuer_signed_offline_is_imported(tmp_path: Path) -> None:
    fs, root = _offline_store(tmp_path)
    with pytest.raises(StoreError, match=r"kept offline.*'trustmesh pki issuer sign --csr'"):
        issue_issuer(fs, now=T0)
    issuer = create_issuer(PrivateKey.generate(), root, now=T0, lifetime=timedelta(days=30))
    state = import_issuer(fs, issuer, now=T0 + timedelta(minutes=1))
    assert state.require_issuer().certificate == issuer.certificate
    assert state.anchor == root.certificate and state.anchor_key is None
    # the cron job cannot renew it: a planned human step once due
    due = plan(state, RenewalPolicy(), T0 + timedelta(days=25))
    assert due.issuer.due and not due.renew_issuer
    assert any("kept offline" in a for a in due.human_actions)
    assert not plan(state, RenewalPolicy(), T0 + timedelta(days=1)).human_actions


def test_an_issuer_signed_by_the_staged_offline_anchor_activates_it(tmp_path: Path) -> None:
    fs, root = _offline_store(tmp_path)
    import_issuer(fs, create_issuer(PrivateKey.generate(), root, now=T0), now=T0)
    next_key = PrivateKey.generate()
    staged = init_anchor(fs, now=T0, stage=True, key=next_key, store_key=False)
    new = staged.next_anchor
    assert new is not None and staged.next_anchor_key is None
    with pytest.raises(StoreError, match="'trustmesh pki issuer import' the certificate here"):
        activate_anchor(fs, now=T0)
    issuer = create_issuer(PrivateKey.generate(), Credential(new, next_key), now=T0)
    active = import_issuer(fs, issuer, now=T0 + timedelta(minutes=1))
    assert active.anchor == new and active.next_anchor is None and active.anchor_key is None
    assert {ANCHOR_KEY, NEXT_ANCHOR, NEXT_ANCHOR_KEY}.isdisjoint(active.files)
    assert root.certificate in active.require_bundle()  # still trusted until removed


def test_an_issuer_csr_signed_by_the_staged_offline_anchor_activates_it(tmp_path: Path) -> None:
    """The CSR flow: the issuer key is made in the store and stays there; the certificate the
    offline (staged) anchor signs for it is paired with it on import, which activates the
    staged anchor and empties the pending slot."""
    fs, root = _offline_store(tmp_path)
    import_issuer(fs, create_issuer(PrivateKey.generate(), root, now=T0), now=T0)
    next_key = PrivateKey.generate()
    staged = init_anchor(fs, now=T0, stage=True, key=next_key, store_key=False)
    new = staged.next_anchor
    assert new is not None
    requested, csr = request_issuer(fs, now=T0)
    pending = requested.pending_issuer_key
    assert pending is not None and PENDING_ISSUER_KEY in requested.files
    again, csr_again = request_issuer(fs, now=T0)
    assert again.version == requested.version  # the same key's CSR, nothing written
    public_key, common_name = validate_ca_csr(csr)
    assert pending.matches(validate_ca_csr(csr_again)[0])
    assert pending.matches(public_key) and common_name == "TrustMesh identity issuer"
    cert = issuer_certificate(public_key, Credential(new, next_key), now=T0)
    active = import_issuer_certificate(fs, [cert], now=T0 + timedelta(minutes=1))
    assert active.anchor == new and active.next_anchor is None
    assert active.pending_issuer_key is None and PENDING_ISSUER_KEY not in active.files
    assert active.require_issuer().certificate == cert
    assert active.require_issuer().key.to_pem() == pending.to_pem()
    with pytest.raises(StoreError, match="no issuer key is pending"):
        import_issuer_certificate(fs, [cert], now=T0 + timedelta(minutes=2))


def test_import_refusals_write_nothing(tmp_path: Path) -> None:
    fs, root = _offline_store(tmp_path)
    good = create_issuer(PrivateKey.generate(), root, now=T0)
    import_issuer(fs, good, now=T0)
    # an old anchor (still in the bundle, no longer signing) after a one-step rotation
    init_anchor(fs, now=T0, rotate=True, key=PrivateKey.generate(), store_key=False)
    version = fs.current_version()
    stranger = build_chain(KeyAlgorithm.ECDSA_P256)
    leaf = stranger.leaf
    cases = [
        (create_issuer(PrivateKey.generate(), stranger.anchor, now=T0),
         "is not signed by any of the 2 anchor"),
        (create_issuer(PrivateKey.generate(), root, now=T0),
         "which is neither the signing anchor nor the staged one"),
        (Credential(leaf.certificate, leaf.key), "is not a CA certificate"),
    ]  # fmt: skip
    for credential, message in cases:
        with pytest.raises(StoreError, match=message):
            import_issuer(fs, credential, now=T0)
    assert fs.current_version() == version


def test_import_refuses_an_expired_issuer_and_one_that_cannot_sign_leaves(tmp_path: Path) -> None:
    fs, root = _offline_store(tmp_path)
    short = create_issuer(PrivateKey.generate(), root, now=T0, lifetime=timedelta(hours=1))
    with pytest.raises(PKIError, match="expired"):
        import_issuer(fs, short, now=T0 + timedelta(hours=2))
    no_cert_sign = hand_built_issuer(
        root, not_before=T0 - timedelta(minutes=1), not_after=T0 + timedelta(days=2),
        key_cert_sign=False,
    )  # fmt: skip
    with pytest.raises(PKIError, match="keyCertSign"):
        import_issuer(fs, no_cert_sign, now=T0)
    assert fs.load().issuer is None


def test_anchor_in_use_names_the_issuer_valid_longest(store: FileStore) -> None:
    first = store.load()
    anchor = first.require_bundle().anchors[0]
    assert anchor_in_use(store, anchor, now=T0) == AnchorInUse(
        first.require_issuer().certificate, first.version
    )
    later = issue_issuer(store, now=T0 + timedelta(hours=30), reason="renewed")
    used = anchor_in_use(store, anchor, now=T0 + timedelta(hours=31))
    assert used == AnchorInUse(later.require_issuer().certificate, later.version)
    # Another anchor's issuer does not count; nor does an expired one.
    other = init_anchor(store, now=T0 + timedelta(hours=31), stage=True).next_anchor
    assert other is not None
    assert anchor_in_use(store, other, now=T0 + timedelta(hours=31)) is None
    gone = later.require_issuer().certificate.not_after + timedelta(seconds=1)
    assert anchor_in_use(store, anchor, now=gone) is None
