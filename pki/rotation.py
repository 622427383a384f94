"""Rotation: the pure plan for the issuer and anchors, and the store operations that carry it out.

``plan(state, policy, now)`` looks at a store version and says what the cron job must do: renew
the issuer or not, and whether a human must act (the anchor is inside its warning window, or the
issuer can no longer be renewed for its full validity before the anchor expires). The anchor is
never replaced automatically: that changes what every workload trusts and is a human decision.

The cron job's life is a table of ``(stage, event) -> stage`` walked by :func:`advance`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa

from pki.bundle import TrustBundle
from pki.certs import (
    DEFAULT_ANCHOR_LIFETIME,
    DEFAULT_CLOCK_SKEW,
    DEFAULT_ISSUER_LIFETIME,
    ISSUER_COMMON_NAME,
    Certificate,
    Credential,
    create_anchor,
    create_issuer,
)
from pki.csr import create_ca_csr
from pki.errors import BundleError, PKIError, StoreError
from pki.keys import KeyAlgorithm, PrivateKey
from pki.renewal import RenewalDecision, RenewalPolicy, decide
from pki.store import (
    ANCHOR,
    ANCHOR_KEY,
    BUNDLE,
    ISSUER,
    ISSUER_KEY,
    ISSUER_SETTINGS,
    NEXT_ANCHOR,
    NEXT_ANCHOR_KEY,
    PENDING_ISSUER_KEY,
    FileStore,
    StoreState,
    issuer_settings,
)
from pki.verify import anchor_for, check_can_issue, verify_chain

ANCHOR_WARNING_WINDOW = timedelta(days=60)


class Stage(enum.Enum):
    START = "start"
    PLANNED = "planned"
    RENEWING = "renewing"
    DONE = "done"
    NEEDS_HUMAN = "needs-human"
    FAILED = "failed"


class Event(enum.Enum):
    PLAN_OK = "plan-ok"  # plan computed
    NOT_DUE = "not-due"
    DUE = "due"
    COMMITTED = "committed"
    HUMAN_ACTION = "human-action"
    ERROR = "error"
    DRY_RUN = "dry-run"  # due, but --dry-run: nothing written


TRANSITIONS: dict[tuple[Stage, Event], Stage] = {
    (Stage.START, Event.PLAN_OK): Stage.PLANNED,
    (Stage.START, Event.ERROR): Stage.FAILED,
    (Stage.PLANNED, Event.NOT_DUE): Stage.DONE,
    (Stage.PLANNED, Event.DUE): Stage.RENEWING,
    (Stage.PLANNED, Event.DRY_RUN): Stage.DONE,
    (Stage.PLANNED, Event.HUMAN_ACTION): Stage.NEEDS_HUMAN,
    (Stage.RENEWING, Event.COMMITTED): Stage.DONE,
    (Stage.RENEWING, Event.ERROR): Stage.FAILED,
    (Stage.DONE, Event.HUMAN_ACTION): Stage.NEEDS_HUMAN,
}


class InvalidTransition(PKIError):
    """An event that the rotation state machine does not accept in its current stage."""


def advance(stage: Stage, event: Event) -> Stage:
    try:
        return TRANSITIONS[(stage, event)]
    except KeyError:
        raise InvalidTransition(
            f"event {event.value} is not valid in stage {stage.value}"
        ) from None


class AnchorStatus(enum.Enum):
    OK = "ok"
    WARNING = "warning"  # inside the warning window: plan the anchor rotation now
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class RotationPlan:
    """What the cron job should do for one store version at ``now``."""

    now: datetime
    issuer: RenewalDecision
    anchor_status: AnchorStatus
    anchor_expires: datetime
    renewed_issuer_not_after: datetime  # NotAfter a renewal now would get (after clamping)
    issuer_lifetime: timedelta  # what a renewal asks for (issuer.json), not the current window
    human_actions: tuple[str, ...]

    anchor_key_present: bool = True

    @property
    def renew_issuer(self) -> bool:
        return (
            self.issuer.due
            and self.anchor_status is not AnchorStatus.EXPIRED
            and self.anchor_key_present
        )


def plan(
    state: StoreState,
    policy: RenewalPolicy,
    now: datetime,
    *,
    anchor_warning: timedelta = ANCHOR_WARNING_WINDOW,
    jitter_sample: float = 0.0,
) -> RotationPlan:
    """The rotation plan for ``state`` at ``now`` (pure)."""
    bundle = state.require_bundle()
    issuer = state.require_issuer()
    anchor = state.anchor or min(bundle.anchors, key=lambda c: c.not_after)
    decision = decide(
        issuer.certificate, policy, now, jitter_sample=jitter_sample, not_after=issuer.expires
    )
    # The lifetime a renewal asks for: the current certificate's window may have been cut
    # short by the anchor, and would hide that the next one will be too.
    lifetime = next_issuer_lifetime(state)
    wanted_not_after = now + lifetime + DEFAULT_CLOCK_SKEW  # as create_issuer sets it
    renewed_not_after = min(wanted_not_after, anchor.not_after)
    actions: list[str] = []
    rotate = "'trustmesh pki anchor create --staged', then 'trustmesh pki anchor activate'"
    if state.next_anchor is not None:
        rotate = (
            f"anchor {state.next_anchor.fingerprint[:16]} is staged: activate it with "
            "'trustmesh pki anchor activate' once every workload holds the bundle"
        )
    if now >= anchor.not_after:
        status = AnchorStatus.EXPIRED
        actions.append(
            f"the trust anchor expired at {anchor.not_after.isoformat()}: create a new anchor "
            "('trustmesh pki anchor create --rotate'), distribute the bundle, then a new issuer"
            if state.next_anchor is None
            else f"the trust anchor expired at {anchor.not_after.isoformat()}; {rotate}"
        )
    elif anchor.not_after - now <= anchor_warning:
        status = AnchorStatus.WARNING
        actions.append(
            f"the trust anchor expires at {anchor.not_after.isoformat()} (within "
            f"{anchor_warning.days} days): "
            + (f"rotate it: {rotate}" if state.next_anchor is None else rotate)
        )
    else:
        status = AnchorStatus.OK
    if state.anchor_key is None and decision.due and status is not AnchorStatus.EXPIRED:
        actions.append(
            f"the issuer is due ({decision.action.value}; it expires "
            f"{issuer.expires.isoformat()}) and the anchor's key is kept offline: 'trustmesh pki "
            "issuer csr' here, sign the CSR where the key is ('trustmesh pki issuer sign --csr') "
            "and 'trustmesh pki issuer import' the certificate"
        )
    if status is not AnchorStatus.EXPIRED and renewed_not_after < wanted_not_after:
        actions.append(
            f"a renewed issuer would be cut short to {renewed_not_after.isoformat()} by the "
            "anchor's expiry: rotate the anchor"
        )
    return RotationPlan(
        now=now,
        issuer=decision,
        anchor_status=status,
        anchor_expires=anchor.not_after,
        renewed_issuer_not_after=renewed_not_after,
        issuer_lifetime=lifetime,
        human_actions=tuple(actions),
        anchor_key_present=state.anchor_key is not None,
    )


# --- store operations (each under the store lock, one atomic version each) -----------------


def _require_store(store: FileStore) -> None:
    # Checked before taking the lock: lock() creates the store directory, which only
    # 'anchor create' may do; a mistyped --store must leave nothing behind.
    if store.current_version() is None:
        store.load()  # raises StoreNotInitialized naming the path


def init_anchor(
    store: FileStore,
    *,
    now: datetime,
    algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256,
    lifetime: timedelta = DEFAULT_ANCHOR_LIFETIME,
    rotate: bool = False,
    stage: bool = False,
    common_name: str = "TrustMesh trust anchor",
    key: PrivateKey | None = None,
    store_key: bool = True,
) -> StoreState:
    """Create the trust anchor. With ``rotate``, add a new anchor beside the existing ones.

    The new anchor becomes the one that signs issuers; the old ones stay in the bundle until
    removed with ``bundle remove`` once every workload trusts the new one. With ``stage`` (a
    rotation in two steps) the new anchor only joins the bundle: the current anchor keeps
    signing until :func:`activate_anchor`, so that no issuer chains to an anchor the workloads
    have not received yet.

    ``key`` is the anchor's key (default: a new one of ``algorithm``). With ``store_key=False``
    the key stays out of the store (kept offline by the caller, who wrote it elsewhere first):
    issuers are then signed with :func:`pki.certs.create_issuer` where the key is, and brought
    in with :func:`import_issuer`.
    """
    if stage:
        _require_store(store)  # only a first 'anchor create' may create the store
    with store.lock():
        current = store.load() if store.current_version() is not None else None
        has_anchor = current is not None and current.anchor is not None
        if has_anchor and not (rotate or stage):
            assert current is not None and current.anchor is not None
            raise StoreError(
                f"{store.root} already has a trust anchor ({current.anchor.fingerprint[:16]}…); "
                "use --rotate to add a new one beside it"
            )
        if stage and not has_anchor:
            raise StoreError(
                f"{store.root} has no trust anchor to rotate from; create the first one with "
                "'trustmesh pki anchor create'"
            )
        if current is not None and current.next_anchor is not None:
            raise StoreError(
                f"anchor {current.next_anchor.fingerprint[:16]}… is already staged; activate it "
                "('trustmesh pki anchor activate') or discard it ('trustmesh pki bundle remove "
                f"{current.next_anchor.fingerprint[:16]}') first"
            )
        key = key or PrivateKey.generate(algorithm)
        anchor = create_anchor(key, now=now, lifetime=lifetime, common_name=common_name)
        bundle = TrustBundle((anchor,))
        if current is not None and current.bundle is not None:
            bundle = current.bundle.add(anchor)
        key_pem = key.to_pem() if store_key else None  # None also drops a previous anchor's key
        offline = "" if store_key else "; its key is kept offline"
        if stage:
            return store.commit(
                {BUNDLE: bundle.pem(), NEXT_ANCHOR: anchor.pem, NEXT_ANCHOR_KEY: key_pem},
                reason=f"anchor {anchor.fingerprint[:16]} staged (in the bundle, not signing)"
                + offline,
                now=now,
            )
        reason = "anchor rotated (new anchor added to bundle)" if current else "anchor created"
        return store.commit(
            {BUNDLE: bundle.pem(), ANCHOR: anchor.pem, ANCHOR_KEY: key_pem},
            reason=reason + offline,
            now=now,
        )


def activate_anchor(
    store: FileStore, *, now: datetime, bundle_digest: str | None = None
) -> StoreState:
    """Second step of a staged rotation: the staged anchor becomes the signing anchor and a new
    issuer, signed by it, replaces the old one, in one store version.

    Run it once every workload holds the bundle with the staged anchor (``trustmesh check``
    and the identity service's bundle reports show which proxies do). The old anchor stays in
    the bundle, trusted, until ``bundle remove`` once the leaves issued under it have expired.
    With ``bundle_digest`` (the bundle the workloads were checked to hold) it refuses when the
    bundle has changed since.
    """
    _require_store(store)
    with store.lock():
        state = store.load()
        staged = state.next_anchor
        if staged is None:
            raise StoreError(
                "no anchor is staged; stage one with 'trustmesh pki anchor create --staged'"
            )
        if state.next_anchor_key is None:
            raise StoreError(
                f"the staged anchor {staged.fingerprint[:16]}…'s private key is not in the store; "
                "'trustmesh pki issuer csr' here, sign the CSR with it where the key is "
                "('trustmesh pki issuer sign --csr') and 'trustmesh pki issuer import' the "
                "certificate here: that activates the staged anchor"
            )
        if not staged.is_valid_at(now):
            raise StoreError(
                f"the staged anchor {staged.fingerprint[:16]}… is not valid at {now.isoformat()} "
                f"(valid {staged.not_before.isoformat()} to {staged.not_after.isoformat()})"
            )
        current = state.require_bundle().digest
        if bundle_digest is not None and current != bundle_digest:
            raise StoreError(
                f"the trust bundle changed since the workloads were checked (checked "
                f"{bundle_digest[:16]}, now {current[:16]}); check again before activating"
            )
        signer = Credential(staged, state.next_anchor_key)
        algorithm, lifetime = _issuer_parameters(state, None, None)
        issuer = _new_issuer(state, now=now, algorithm=algorithm, lifetime=lifetime, signer=signer)
        return store.commit(
            {
                ANCHOR: staged.pem,
                ANCHOR_KEY: state.next_anchor_key.to_pem(),
                NEXT_ANCHOR: None,
                NEXT_ANCHOR_KEY: None,
                ISSUER: issuer.chain_pem(),
                ISSUER_KEY: issuer.key.to_pem(),
                ISSUER_SETTINGS: issuer_settings(lifetime),
            },
            reason=f"staged anchor {staged.fingerprint[:16]} activated; issuer re-signed by it",
            now=now,
        )


def _new_issuer(
    state: StoreState,
    *,
    now: datetime,
    algorithm: KeyAlgorithm,
    lifetime: timedelta,
    signer: Credential | None = None,
) -> Credential:
    issuer = create_issuer(
        PrivateKey.generate(algorithm),
        signer or state.anchor_credential(),
        now=now,
        lifetime=lifetime,
    )
    verify_chain(issuer.certificate, issuer.chain, state.require_bundle(), at=now)
    return issuer


def issue_issuer(
    store: FileStore,
    *,
    now: datetime,
    algorithm: KeyAlgorithm | None = None,
    lifetime: timedelta | None = None,
    reason: str = "issuer created",
    replace: bool = True,
) -> StoreState:
    """Create (or immediately replace) the issuer, signed by the store's anchor.

    Algorithm and lifetime default to the current issuer's, else ECDSA P-256 and 48 h. With
    ``replace=False`` an existing issuer is an error, decided under the lock so that two
    concurrent creations cannot both succeed.
    """
    _require_store(store)
    with store.lock():
        state = store.load()
        if not replace and state.issuer is not None:
            raise StoreError(
                f"{store.root} already has an issuer; replace it with 'trustmesh pki issuer rotate'"
            )
        return _issue_locked(store, state, now, algorithm, lifetime, reason)


def _issue_locked(
    store: FileStore,
    state: StoreState,
    now: datetime,
    algorithm: KeyAlgorithm | None,
    lifetime: timedelta | None,
    reason: str,
) -> StoreState:
    algorithm, lifetime = _issuer_parameters(state, algorithm, lifetime)
    issuer = _new_issuer(state, now=now, algorithm=algorithm, lifetime=lifetime)
    return store.commit(
        {
            ISSUER: issuer.chain_pem(),
            ISSUER_KEY: issuer.key.to_pem(),
            ISSUER_SETTINGS: issuer_settings(lifetime),
        },
        reason=reason,
        now=now,
    )


def import_issuer(store: FileStore, issuer: Credential, *, now: datetime) -> StoreState:
    """Install an issuer signed elsewhere (by an anchor whose key is kept offline).

    It must be a CA that chains, by signature, to the store's signing anchor or to its staged
    one, be valid at ``now``, and sign leaves that verify against the bundle. An issuer under
    the staged anchor activates it, in the same store version (the anchor's key, if the store
    has it, moves along). Anything else is refused and nothing is written.
    """
    _require_store(store)
    with store.lock():
        return _import_locked(store, store.load(), issuer, now)


def request_issuer(
    store: FileStore,
    *,
    now: datetime,
    algorithm: KeyAlgorithm | None = None,
    new_key: bool = False,
) -> tuple[StoreState, bytes]:
    """A CSR (PEM) for a new issuer, to be signed where the anchor's key is kept offline
    (``pki issuer sign --csr``) and brought back with :func:`import_issuer_certificate`.

    The issuer's key is made here and kept in the store (``pending-issuer.key``, 0600): unlike
    an issuer signed with a new key offline, it never leaves this machine. Asked again, the CSR
    is that of the same pending key; ``new_key`` replaces it (a CSR out for signing is then
    void). Returns the store state and the CSR.
    """
    _require_store(store)
    with store.lock():
        state = store.load()
        state.require_bundle()
        key = state.pending_issuer_key
        if key is not None and algorithm is not None and key.algorithm != algorithm and not new_key:
            raise StoreError(
                f"the pending issuer key is {key.algorithm.value}; pass --new-key to replace it "
                f"with a {algorithm.value} key (its CSR, if out for signing, becomes void)"
            )
        if key is None or new_key:
            key = PrivateKey.generate(_issuer_parameters(state, algorithm, None)[0])
            state = store.commit(
                {PENDING_ISSUER_KEY: key.to_pem()},
                reason=f"issuer key made ({key.algorithm.value}) for a CSR to an offline anchor",
                now=now,
            )
    return state, create_ca_csr(key, ISSUER_COMMON_NAME)


def import_issuer_certificate(
    store: FileStore, chain: Sequence[Certificate], *, now: datetime
) -> StoreState:
    """Install the certificate (and chain) an offline anchor signed for the store's pending
    issuer key (:func:`request_issuer`), with that key; the same checks as
    :func:`import_issuer`. The pending key leaves the store's pending slot for its issuer's."""
    _require_store(store)
    if not chain:
        raise StoreError("no certificate given")
    with store.lock():
        state = store.load()
        key = state.pending_issuer_key
        if key is None:
            raise StoreError(
                f"no issuer key is pending in {store.root}: give the issuer's key with --key, or "
                "start with 'trustmesh pki issuer csr' (the key then never leaves the store)"
            )
        cert = chain[0]
        if not key.matches(cert.x509.public_key()):
            raise StoreError(
                f"certificate {cert.subject} ({cert.fingerprint[:16]}…) is not for the pending "
                f"issuer key of {store.root}: sign the CSR 'trustmesh pki issuer csr' wrote for "
                "this store (a newer one voids the older)"
            )
        return _import_locked(store, state, Credential(cert, key, tuple(chain[1:])), now)


def _import_locked(
    store: FileStore, state: StoreState, issuer: Credential, now: datetime
) -> StoreState:
    cert = issuer.certificate
    if not cert.is_ca:
        raise StoreError(f"{cert.subject} is not a CA certificate; an issuer must be one")
    bundle = state.require_bundle()
    anchor = anchor_for(issuer.full_chain, bundle)
    if anchor is None:
        raise StoreError(
            f"issuer {cert.subject} ({cert.fingerprint[:16]}…) is not signed by any of the "
            f"{len(bundle.anchors)} anchor(s) of {store.root}'s trust bundle"
        )
    if anchor not in (state.anchor, state.next_anchor):
        raise StoreError(
            f"issuer {cert.fingerprint[:16]}… chains to anchor {anchor.fingerprint[:16]}…, "
            "which is neither the signing anchor nor the staged one"
        )
    verify_chain(cert, issuer.chain, bundle, at=now)
    check_can_issue(issuer, bundle, at=now)
    changes: dict[str, bytes | None] = {
        ISSUER: issuer.chain_pem(),
        ISSUER_KEY: issuer.key.to_pem(),
    }
    pending = state.pending_issuer_key
    if pending is not None and pending.matches(cert.x509.public_key()):
        changes[PENDING_ISSUER_KEY] = None  # it is the issuer's key now
    reason = f"issuer {cert.fingerprint[:16]} imported (signed by anchor {anchor.fingerprint[:16]})"
    if anchor == state.next_anchor:
        staged_key = state.next_anchor_key
        changes.update({
            ANCHOR: anchor.pem,
            ANCHOR_KEY: staged_key.to_pem() if staged_key is not None else None,
            NEXT_ANCHOR: None,
            NEXT_ANCHOR_KEY: None,
        })  # fmt: skip
        reason += "; the staged anchor is activated"
    return store.commit(changes, reason=reason, now=now)


def _issuer_parameters(
    state: StoreState, algorithm: KeyAlgorithm | None, lifetime: timedelta | None
) -> tuple[KeyAlgorithm, timedelta]:
    """A new issuer's algorithm and lifetime: as given, else the current issuer's algorithm and
    the lifetime recorded in the store, else the defaults (ECDSA P-256, 48 h)."""
    if state.issuer is not None:
        algorithm = algorithm or state.issuer.certificate.key_algorithm
    lifetime = lifetime or state.issuer_lifetime or _uncut_lifetime(state)
    return algorithm or KeyAlgorithm.ECDSA_P256, lifetime or DEFAULT_ISSUER_LIFETIME


def next_issuer_lifetime(state: StoreState) -> timedelta:
    """The lifetime the next issuer of ``state`` will ask for (before any clamping)."""
    return _issuer_parameters(state, None, None)[1]


def _uncut_lifetime(state: StoreState) -> timedelta | None:
    """The current issuer's lifetime as issued, for stores from before ``issuer.json``; None when
    its anchor's NotAfter cut it short (an issuer renewed late in the anchor's life would
    otherwise hand its shortened life to every issuer after it, across anchor rotations)."""
    issuer = state.issuer
    if issuer is None or state.bundle is None:
        return None
    anchor = anchor_for(issuer.full_chain, state.bundle)
    if anchor is None or issuer.expires >= anchor.not_after:
        return None
    lifetime = issuer.certificate.lifetime - 2 * DEFAULT_CLOCK_SKEW
    return lifetime if lifetime > timedelta(0) else None


def rotate_if_due(
    store: FileStore, policy: RenewalPolicy, *, now: datetime, dry_run: bool = False
) -> tuple[RotationPlan, StoreState | None]:
    """The cron job's core: plan under the lock and renew the issuer when due.

    Returns the plan and the new state (None when nothing was written).
    """
    _require_store(store)
    with store.lock():
        state = store.load()
        p = plan(state, policy, now)
        if not p.renew_issuer or dry_run:
            return p, None
        new = _issue_locked(store, state, now, None, None, "issuer renewed by rotate")
        store.prune()
        return p, new


MIN_ANCHOR_KEY_BITS = {"RSA": 2048, "DSA": 2048, "EC": 256}


def check_new_anchor(cert: Certificate, now: datetime) -> None:
    """Refuse a certificate that must not join a trust bundle at ``now``.

    Checked only on admission, so that a store already holding such an anchor still loads.
    """
    if not cert.is_ca:
        raise BundleError(f"{cert.subject} is not a CA certificate")
    serial = cert.serial
    if serial <= 0:
        # RFC 5280 requires a positive serial; cryptography warns on load today and will
        # refuse to load such a certificate later, which would make the store unreadable.
        raise BundleError(
            f"{cert.subject} has serial number {serial}; RFC 5280 requires a positive serial"
        )
    key = cert.x509.public_key()
    kind = (
        "RSA" if isinstance(key, rsa.RSAPublicKey)
        else "DSA" if isinstance(key, dsa.DSAPublicKey)
        else "EC" if isinstance(key, ec.EllipticCurvePublicKey)
        else None
    )  # fmt: skip
    if kind is not None and key.key_size < MIN_ANCHOR_KEY_BITS[kind]:  # type: ignore[union-attr]
        raise BundleError(
            f"{cert.subject} has a {kind}-{key.key_size} key; "  # type: ignore[union-attr]
            f"an anchor needs at least {MIN_ANCHOR_KEY_BITS[kind]} bits"
        )
    if now >= cert.not_after:
        raise BundleError(f"{cert.subject} expired at {cert.not_after.isoformat()}")


def bundle_add(store: FileStore, anchor_pem: bytes, *, now: datetime) -> StoreState:
    from pki.certs import load_pem_chain

    _require_store(store)
    with store.lock():
        state = store.load()
        bundle = state.require_bundle()
        for cert in load_pem_chain(anchor_pem):
            check_new_anchor(cert, now)
            bundle = bundle.add(cert)
        return store.commit({BUNDLE: bundle.pem()}, reason="anchor added to bundle", now=now)


@dataclass(frozen=True, slots=True)
class AnchorInUse:
    """An issuer of the store's history that chains to an anchor and is still valid: the
    certificates it signed may be in use until its NotAfter (a leaf never outlives its issuer)."""

    issuer: Certificate
    version: int


def anchor_in_use(store: FileStore, anchor: Certificate, *, now: datetime) -> AnchorInUse | None:
    """The issuer valid longest at ``now``, among those of the store's kept versions, that
    chains to ``anchor``; None when none does. Versions pruned away are not seen."""
    from pki.certs import load_pem_chain

    found: AnchorInUse | None = None
    only = TrustBundle.of([anchor])
    for version in store.versions():
        try:
            chain = load_pem_chain((store.version_path(version) / ISSUER).read_bytes())
            verify_chain(chain[0], chain[1:], only, at=now)
        except (OSError, PKIError, IndexError):
            continue  # no issuer in that version, another anchor's, or expired
        if found is None or chain[0].not_after > found.issuer.not_after:
            found = AnchorInUse(chain[0], version)
    return found


def bundle_remove(
    store: FileStore, fingerprint: str, *, now: datetime, force: bool = False
) -> StoreState:
    """Remove an anchor from the bundle. A staged one is discarded with its key. The signing
    anchor, and the anchor the current issuer chains to, are refused; so, unless ``force``, is
    one that an issuer still valid chains to: proxies given the new bundle would refuse every
    workload certificate that issuer signed."""
    _require_store(store)
    with store.lock():
        state = store.load()
        bundle = state.require_bundle()
        target = bundle.find(fingerprint)
        if state.next_anchor is not None and target == state.next_anchor:
            # Discarding a staged anchor: it signed nothing, so it leaves the bundle with it.
            return store.commit(
                {BUNDLE: bundle.remove(target.fingerprint).pem(), NEXT_ANCHOR: None,
                 NEXT_ANCHOR_KEY: None},
                reason=f"staged anchor {target.fingerprint[:16]} discarded",
                now=now,
            )  # fmt: skip
        if state.anchor is not None and target == state.anchor:
            raise BundleError(
                "refusing to remove the anchor that signs the current issuer; "
                "rotate the anchor first ('trustmesh pki anchor create --rotate')"
            )
        # After 'anchor create --rotate' the store's anchor is the new one, but the issuer may
        # still chain to the old anchor until it is replaced: removing that one would leave the
        # issuer untrusted, and every workload certificate with it.
        if state.issuer is not None:
            try:
                path = verify_chain(state.issuer.certificate, state.issuer.chain, bundle, at=now)
            except PKIError:
                path = ()
            if path and path[-1] == target:
                raise BundleError(
                    "refusing to remove the anchor that the current issuer chains to; "
                    "replace the issuer first ('trustmesh pki issuer rotate')"
                )
        used = None if force else anchor_in_use(store, target, now=now)
        if used is not None:
            until = used.issuer.not_after.isoformat()
            raise BundleError(
                f"refusing to remove anchor {target.fingerprint[:16]}: issuer "
                f"{used.issuer.fingerprint[:16]} (store version {used.version}) chains to it and "
                f"is valid until {until}, and the workload certificates it signed may be in use "
                "until then: every proxy given the new bundle would refuse them. Remove it after "
                f"{until}, or with --force once every workload has renewed under the new issuer"
            )
        return store.commit(
            {BUNDLE: bundle.remove(target.fingerprint).pem()},
            reason=f"anchor {target.fingerprint[:16]} removed from bundle",
            now=now,
        )
