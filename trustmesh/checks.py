"""``trustmesh check``: Linkerd-style health checks, as data.

Checks are grouped in categories like ``linkerd check``'s (``trustmesh-identity`` mirrors
``linkerd-identity`` check for check, with expiry windows taken from the alert thresholds so
that a 48h issuer is judged by its renewal window, not by a fixed 60 days). Each result is
``success``, ``warning`` or ``error``; a result that is not a success names the alert whose
runbook to follow, and :class:`RunbookLinks` turns that into the hint shown (a published URL, or
the runbook file of this installation). A failed *fatal* check stops the run, as in Linkerd. The
JSON form is Linkerd's:
``{success, categories: [{categoryName, checks: [{description, result, hint?, error?}]}]}``.

The functions here are pure (the facts are gathered by the caller: the store state, the HTTP
answers of admin endpoints, the current time); :func:`probe_admin` and
:func:`probe_caller_bundles` are the I/O helpers. :func:`activation_blockers` is the gate of
``pki anchor activate --proxy/--identity``.
"""

from __future__ import annotations

import dataclasses
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from alerts.inventory import cert_times
from alerts.thresholds import ALERTS_BY_ROLE, evaluate
from pki.certs import Certificate
from pki.errors import PKIError
from pki.store import StoreState
from pki.verify import check_validity, verify_chain

SUCCESS, WARNING, ERROR = "success", "warning", "error"
# The runbooks ship beside the packages in a checkout or an editable install.
RUNBOOKS_DIR = Path(__file__).resolve().parents[1] / "runbooks"


@dataclass(frozen=True, slots=True)
class RunbookLinks:
    """Where a hint sends the reader: ``<base_url>/runbooks/<Alert>.md`` when the runbooks are
    published (the same base as ``trustmesh alerts rules --runbook-base-url``), else the file in
    ``directory`` (an absolute path, so it opens from any working directory), else the path in
    the repository."""

    base_url: str | None = None
    directory: Path | None = None

    def hint(self, alert: str) -> str:
        if self.base_url:
            return f"see {self.base_url}/runbooks/{alert}.md"
        if self.directory is not None:
            return f"see {self.directory / f'{alert}.md'}"
        return f"see runbooks/{alert}.md"


@dataclass(frozen=True, slots=True)
class CheckResult:
    description: str
    result: str = SUCCESS
    runbook: str = ""  # the alert whose runbook says what to do when this is not a success
    error: str = ""
    fatal: bool = False

    def __post_init__(self) -> None:
        if self.result not in (SUCCESS, WARNING, ERROR):
            raise ValueError(f"result must be success, warning or error, not {self.result!r}")
        if self.result != SUCCESS and not self.runbook:
            raise ValueError(f"{self.description!r}: a {self.result} must name its runbook")

    def as_json(self, links: RunbookLinks) -> dict[str, str]:
        out = {"description": self.description, "result": self.result}
        if self.result != SUCCESS:
            out |= {"hint": links.hint(self.runbook), "error": self.error}
        return out


@dataclass(frozen=True, slots=True)
class Category:
    name: str
    checks: tuple[CheckResult, ...]


@dataclass(frozen=True, slots=True)
class Report:
    categories: tuple[Category, ...] = field(default_factory=tuple)

    @property
    def success(self) -> bool:
        """True when no check ended in ``error`` (warnings do not fail the run)."""
        return all(c.result != ERROR for cat in self.categories for c in cat.checks)

    def as_json(self, links: RunbookLinks) -> dict[str, Any]:
        return {
            "success": self.success,
            "categories": [
                {"categoryName": cat.name, "checks": [c.as_json(links) for c in cat.checks]}
                for cat in self.categories
            ],
        }


def _ok(description: str) -> CheckResult:
    return CheckResult(description)


def _expiry(
    description: str, certs: Sequence[Certificate], role: str, now: datetime
) -> CheckResult:
    warn_alert, crit_alert = ALERTS_BY_ROLE[role]
    worst: tuple[str, str, str] | None = None
    for cert in certs:
        fired = {f.alertname for f in evaluate(cert_times(cert, role, "store"), now.timestamp())}
        if not fired:
            continue
        level, alert = (ERROR, crit_alert) if crit_alert in fired else (WARNING, warn_alert)
        message = f"{cert.subject} will expire on {cert.not_after.isoformat()}"
        if worst is None or level == ERROR:
            worst = (level, alert, message)
    if worst is None:
        return _ok(description)
    return CheckResult(description, worst[0], worst[1], worst[2])


def _algorithms(description: str, certs: Sequence[Certificate], alert: str) -> CheckResult:
    for cert in certs:
        try:
            cert.key_algorithm  # noqa: B018 - raises for an unsupported algorithm
        except PKIError as e:
            return CheckResult(description, ERROR, alert, f"{cert.subject}: {e}", True)
    return _ok(description)


def _validity(
    description: str, certs: Sequence[Certificate], now: datetime, alert: str
) -> CheckResult:
    for cert in certs:
        try:
            check_validity(cert, now)
        except PKIError as e:
            return CheckResult(description, ERROR, alert, str(e), True)
    return _ok(description)


# An issuer CSR out for signing longer than this warns (the offline anchor's signing waits on
# a person; a day is a working day's slack before the issuer renewal window closes in on it).
PENDING_CSR_WARN = timedelta(hours=24)


def identity_category(
    state: StoreState | Exception, now: datetime, pending_since: datetime | None = None
) -> Category:
    """Linkerd's eight ``linkerd-identity`` checks against a TrustMesh store, in order; a ninth
    when an issuer CSR is out for signing (its key made at ``pending_since``)."""
    name = "trustmesh-identity"
    config = "certificate config is valid"
    if isinstance(state, Exception):
        return Category(name, (CheckResult(config, ERROR, "IssuerRefused", str(state), True),))
    if state.bundle is None or state.issuer is None:
        missing = "trust bundle" if state.bundle is None else "issuer"
        error = f"the store at {state.path.parent.parent} has no {missing}"
        return Category(name, (CheckResult(config, ERROR, "IssuerRefused", error, True),))
    anchors, issuer = state.bundle.anchors, state.issuer.certificate
    checks = [
        _ok(config),
        _algorithms(
            "trust anchors are using supported crypto algorithm",
            anchors,
            "TrustAnchorExpiryCritical",
        ),
        _validity(
            "trust anchors are within their validity period",
            anchors,
            now,
            "TrustAnchorExpiryCritical",
        ),
        _expiry("trust anchors are not expiring soon", anchors, "trust_anchor", now),
        _algorithms("issuer cert is using supported crypto algorithm", [issuer], "IssuerRefused"),
        _validity(
            "issuer cert is within its validity period", [issuer], now, "IssuerExpiryCritical"
        ),
        _expiry("issuer cert is not expiring soon", [issuer], "issuer", now),
    ]
    try:
        verify_chain(issuer, state.issuer.chain, state.bundle, at=now)
        checks.append(_ok("issuer cert is issued by the trust anchor"))
    except PKIError as e:
        checks.append(
            CheckResult("issuer cert is issued by the trust anchor", ERROR, "IssuerRefused", str(e))
        )
    if state.pending_issuer_key is not None:
        checks.append(_pending_csr(pending_since, now))
    return Category(name, tuple(checks))


def _pending_csr(since: datetime | None, now: datetime) -> CheckResult:
    description = "no issuer CSR has waited long for its signature"
    if since is None or now - since <= PENDING_CSR_WARN:
        return _ok(description)
    hours = (now - since).total_seconds() / 3600
    return CheckResult(
        description,
        WARNING,
        "IssuerExpiringSoon",
        f"an issuer CSR has waited {hours:.0f} h for its signature (its key was made "
        f"{since:%Y-%m-%d %H:%M} UTC): sign it where the anchor key is and 'trustmesh pki "
        "issuer import' the certificate, or void it with 'trustmesh pki issuer csr --new-key'",
    )


@dataclass(frozen=True, slots=True)
class AdminStatus:
    """What an admin endpoint (``/ready`` and ``/metrics``) answered."""

    address: str
    ready: bool
    error: str = ""
    bundle_digests: tuple[str, ...] = ()
    # The identity service's issuer certificates, by fingerprint (its cert_* families).
    issuer_fingerprints: tuple[str, ...] = ()


def probe_admin(address: str, *, timeout: float = 3.0, metrics: bool = False) -> AdminStatus:
    """GET ``/ready`` (and ``/metrics`` for the bundle digest) on an admin HOST:PORT."""
    base = f"http://{address}"
    try:
        with urllib.request.urlopen(f"{base}/ready", timeout=timeout) as response:
            ready, error = response.status == 200, ""
    except urllib.error.HTTPError as e:
        ready, error = False, f"{base}/ready answered HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return AdminStatus(address, False, f"cannot reach {base}: {getattr(e, 'reason', e)}")
    digests: list[str] = []
    issuers: list[str] = []
    if metrics:
        try:
            with urllib.request.urlopen(f"{base}/metrics", timeout=timeout) as response:
                text = response.read().decode(errors="replace")
            for family in text_string_to_metric_families(text):
                if family.name == "trustmesh_proxy_trust_bundle_info":
                    digests += [s.labels.get("digest", "") for s in family.samples]
                elif family.name == "trustmesh_cert_not_after_timestamp_seconds":
                    issuers += [
                        s.labels.get("fingerprint", "")
                        for s in family.samples
                        if s.labels.get("role") == "issuer"
                    ]
        except (urllib.error.URLError, OSError, ValueError) as e:
            error = error or f"cannot read {base}/metrics: {getattr(e, 'reason', e)}"
    return AdminStatus(address, ready, error, tuple(digests), tuple(issuers))


def named(status: AdminStatus, workload: str | None) -> AdminStatus:
    """A proxy found through a running ``up`` is reported as ``workload (HOST:PORT)``."""
    if workload is None:
        return status
    return dataclasses.replace(status, address=f"{workload} ({status.address})")


@dataclass(frozen=True, slots=True)
class CallerBundles:
    """The identity service's ``identity_caller_trust_bundles``: how many identities reported
    each trust-bundle digest at their latest renewal ('' = not reported)."""

    address: str
    counts: Mapping[str, int]
    error: str = ""


CALLER_BUNDLES = "identity_caller_trust_bundles"


def probe_caller_bundles(address: str, *, timeout: float = 3.0) -> CallerBundles:
    """GET ``/metrics`` on an identity service's admin HOST:PORT for the callers' bundles."""
    url = f"http://{address}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode(errors="replace")
        families = {f.name: f for f in text_string_to_metric_families(text)}
    except (urllib.error.URLError, OSError, ValueError) as e:
        return CallerBundles(address, {}, f"cannot read {url}: {getattr(e, 'reason', e)}")
    family = families.get(CALLER_BUNDLES)
    if family is None:
        return CallerBundles(
            address, {}, f"{url} has no {CALLER_BUNDLES} (is it a TrustMesh identity service?)"
        )
    counts: dict[str, int] = {}
    for sample in family.samples:
        digest = sample.labels.get("digest", "")
        counts[digest] = counts.get(digest, 0) + int(sample.value)
    return CallerBundles(address, counts)


def activation_blockers(
    digest: str, proxies: Sequence[AdminStatus], callers: CallerBundles | None
) -> tuple[list[str], list[str]]:
    """Why a staged anchor must not be activated yet, and warnings that do not stop it.

    ``digest`` is the store's bundle (with the staged anchor). A proxy blocks when it does not
    report that bundle, or cannot be asked. The identity service blocks while identities it
    certified last reported another bundle ("other" and "invalid" included): their proxies
    would refuse peers under the new issuer. Identities that report nothing (Linkerd's proxies)
    only warn, since nothing here can tell what they hold.
    """
    blockers: list[str] = []
    warnings: list[str] = []
    for proxy in proxies:
        if digest in proxy.bundle_digests:
            continue
        if proxy.bundle_digests:
            held = ", ".join(d[:16] for d in proxy.bundle_digests)
            blockers.append(f"proxy {proxy.address} holds trust bundle {held}")
        else:
            reason = proxy.error or "it reports no trust bundle"
            blockers.append(f"proxy {proxy.address} cannot confirm its trust bundle ({reason})")
    if callers is not None:
        if callers.error:
            blockers.append(f"identity service: {callers.error}")
        stale = {d: n for d, n in callers.counts.items() if d not in (digest, "") and n > 0}
        if stale:
            listed = ", ".join(f"{n} on {d[:16]}" for d, n in sorted(stale.items()))
            blockers.append(
                f"identity service {callers.address}: {sum(stale.values())} identities last "
                f"renewed holding another trust bundle ({listed}); each reports again at its "
                "next renewal (70 % of its certificate's life) or restart"
            )
        unreported = callers.counts.get("", 0)
        if unreported > 0:
            warnings.append(
                f"{unreported} identities certified by {callers.address} do not report their "
                "trust bundle (Linkerd proxies); check those another way"
            )
    return blockers, warnings


def control_plane_category(
    components: Sequence[tuple[str, AdminStatus]], store_issuer: str | None = None
) -> Category:
    """One readiness check per control-plane component given on the command line; for a
    ready identity service read with ``metrics``, and a store with an issuer (its fingerprint
    ``store_issuer``), whether the service signs with that issuer: after a rotation, this is
    what says that it took the new one."""
    checks = []
    for component, status in components:
        description = f"{component} service is ready"
        if status.ready:
            checks.append(_ok(description))
        else:
            error = status.error or f"{status.address}/ready is not 200"
            checks.append(CheckResult(description, ERROR, "ControlPlaneNotReady", error))
        if component == "identity" and status.ready and store_issuer is not None:
            checks.append(_issuer_in_use(status, store_issuer))
    return Category("trustmesh-control-plane", tuple(checks))


def _issuer_in_use(status: AdminStatus, store_issuer: str) -> CheckResult:
    description = "identity service signs with the store's issuer"
    if store_issuer in status.issuer_fingerprints:
        return _ok(description)
    serving = ", ".join(f[:16] for f in status.issuer_fingerprints) or "none it publishes"
    return CheckResult(
        description,
        WARNING,
        "IssuerRefused",
        f"the store's current issuer is {store_issuer[:16]}, the identity service at "
        f"{status.address} signs with {serving}: it has not loaded the store's issuer (refused, "
        "or not reloaded yet), or it reads another issuer source",
    )


def data_plane_category(
    proxies: Sequence[AdminStatus], bundle_digest: str | None, *, staged_anchor: str | None = None
) -> Category:
    """Proxies ready, and on the store's current trust bundle (Linkerd's "certificate match
    CA", compared by bundle digest instead of by environment variable). With an anchor staged
    (``pki anchor create --staged``), this is the check that says whether it may be activated."""
    not_ready = [f"{p.address} ({p.error or 'not ready'})" for p in proxies if not p.ready]
    checks = [
        CheckResult("data plane proxies are ready")
        if not not_ready
        else CheckResult(
            "data plane proxies are ready",
            ERROR,
            "WorkloadCertRenewalOverdue",
            "Some proxies are not ready: " + ", ".join(not_ready),
        )
    ]
    description = "data plane proxies certificate match CA"
    if bundle_digest is None:
        checks.append(
            CheckResult(
                description,
                WARNING,
                "ProxyTrustBundleStale",
                "no store bundle to compare with",
            )
        )
    else:
        stale = [p.address for p in proxies if p.ready and bundle_digest not in p.bundle_digests]
        checks.append(
            _ok(description)
            if not stale
            else CheckResult(
                description,
                WARNING,
                "ProxyTrustBundleStale",
                "Some proxies do not have the current trust bundle and must be restarted: "
                + ", ".join(stale)
                + (
                    f"; do not activate the staged anchor {staged_anchor[:16]} before they have it"
                    if staged_anchor
                    else ""
                ),
            )
        )
    return Category("trustmesh-identity-data-plane", tuple(checks))


def run(categories: Sequence[Category]) -> Report:
    """Assemble the report, cutting everything after the first failed fatal check."""
    kept: list[Category] = []
    for category in categories:
        checks: list[CheckResult] = []
        for check in category.checks:
            checks.append(check)
            if check.fatal and check.result == ERROR:
                kept.append(Category(category.name, tuple(checks)))
                return Report(tuple(kept))
        kept.append(category)
    return Report(tuple(kept))
