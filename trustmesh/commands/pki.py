"""``trustmesh pki``: trust anchors, issuers, bundles, leaves, inspection and KEM sealing.

The commands are thin: every decision is made by the ``pki`` library; this module parses flags,
reads the clock once per command, writes files atomically and renders results (rich tables for
people, ``-o json`` for machines). Private keys are only ever written to files (0600), never to
stdout.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from pki import kem
from pki.bundle import TrustBundle
from pki.certs import (
    Credential,
    create_issuer,
    issue_leaf,
    issuer_certificate,
    load_pem_chain,
    utcnow,
)
from pki.csr import validate_ca_csr, validate_csr
from pki.durations import format_duration
from pki.errors import CSRError, InvalidName, PKIError
from pki.inspect import (
    CertificateInfo,
    ChainInfo,
    EndpointInfo,
    StoreInfo,
    describe_chain,
    describe_store,
    load_certificates,
    parse_endpoint,
    probe_endpoint,
    read_target,
)
from pki.keys import KeyAlgorithm, PrivateKey
from pki.names import Identity
from pki.renewal import RenewalPolicy
from pki.rotation import (
    activate_anchor,
    anchor_in_use,
    bundle_add,
    bundle_remove,
    import_issuer,
    import_issuer_certificate,
    init_anchor,
    issue_issuer,
    request_issuer,
)
from pki.store import (
    FileStore,
    StoreState,
    write_file_atomic,
    write_files_atomic,
    write_new_file,
)
from pki.verify import anchor_for, check_can_issue, verify_chain, verify_leaf
from trustmesh.checks import activation_blockers, named, probe_admin, probe_caller_bundles
from trustmesh.config import admin_timeout_option, default_store_path, duration_option
from trustmesh.errors import EXIT_USAGE, CLIError

F = TypeVar("F", bound=Callable[..., Any])
ALGORITHMS = [a.value for a in KeyAlgorithm]


# --- shared options --------------------------------------------------------------------------


MAX_VALIDITY = timedelta(days=36500)


def bounded_duration(
    maximum: timedelta, *, allow_zero: bool = False
) -> Callable[[click.Context, click.Parameter, str | None], timedelta | None]:
    """A click callback: a duration in (0, maximum], or [0, maximum] with ``allow_zero``."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> timedelta | None:
        delta = duration_option(ctx, param, value)
        low_ok = delta is None or delta > timedelta(0) or (allow_zero and delta == timedelta(0))
        if delta is not None and not (low_ok and delta <= maximum):
            low = "at least 0s" if allow_zero else "positive"
            raise click.BadParameter(
                f"{value!r} must be {low} and at most {format_duration(maximum).split()[0]}"
                + (" (100 years)" if maximum == MAX_VALIDITY else "")
            )
        return delta

    return callback


_validity = bounded_duration(MAX_VALIDITY)


def _algorithm(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> KeyAlgorithm | None:
    return None if value is None else KeyAlgorithm.parse(value)


def store_option(f: F) -> F:
    """``--store DIR`` on a sub-command; it overrides the one given to ``trustmesh pki``."""
    return click.option(
        "--store",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="The credential store (overrides 'trustmesh pki --store').",
    )(f)


def output_option(f: F) -> F:
    return click.option(
        "-o",
        "--output",
        type=click.Choice(["table", "json"]),
        default="table",
        help="Output format.",
    )(f)


def algorithm_option(default: str | None) -> Callable[[F], F]:
    return click.option(
        "--algorithm",
        type=click.Choice(ALGORITHMS, case_sensitive=False),
        default=default,
        callback=_algorithm,
        show_default=default is not None,
        help="Key algorithm.",
    )


def _store(store: Path | None) -> FileStore:
    if store is None:
        obj = click.get_current_context().find_object(_PKIContext)
        store = obj.store if obj is not None else None
    return FileStore(store or default_store_path())


class _PKIContext:
    def __init__(self, store: Path | None) -> None:
        self.store = store


def _console(err: bool = False) -> Console:
    # Created per call so that click's output capture (and pipes) are honoured.
    # Piped output gets a wide virtual terminal so fingerprints and dates are not folded.
    stream = sys.stderr if err else sys.stdout
    width = None if stream.isatty() else 160
    return Console(file=stream, width=width, soft_wrap=True, highlight=False)


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def _when(info: CertificateInfo) -> str:
    if info.remaining < timedelta(0):
        return f"{info.not_after.isoformat()} (expired {format_duration(-info.remaining)} ago)"
    return f"{info.not_after.isoformat()} ({format_duration(info.remaining)} left)"


# --- rendering for people --------------------------------------------------------------------


def _cert_table(info: CertificateInfo, title: str | None = None) -> Table:
    table = Table(title=title, show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("subject", info.subject),
        ("issuer", info.issuer),
        ("status", info.status),
        ("not before", info.not_before.isoformat()),
        ("not after", _when(info)),
        ("key", info.key_algorithm),
        ("signature", info.signature_algorithm),
        ("CA", f"yes (path length {info.path_length})" if info.is_ca else "no"),
        ("serial", info.serial),
        ("sha256", info.fingerprint),
    ]
    if info.dns_names:
        rows.append(("DNS names", ", ".join(info.dns_names)))
    if info.uris:
        rows.append(("URIs", ", ".join(info.uris)))
    for key, value in rows:
        table.add_row(key, value)
    return table


def _print_chain(console: Console, chain: ChainInfo) -> None:
    for i, info in enumerate(chain.certificates):
        console.print(_cert_table(info, title=f"[{i}] {info.subject}"))
        console.print()
    if chain.verified is not None:
        verdict = "verified" if chain.verified else f"NOT verified: {chain.verify_error}"
        console.print(f"chain: {verdict}")
    console.print(f"chain expires: {chain.expires.isoformat()}")


def _print_store(console: Console, info: StoreInfo) -> None:
    console.print(f"store {info.root}: version {info.version} ({info.reason}, {info.created})")
    console.print(f"bundle digest: {info.bundle_digest}")
    anchors = Table(title="trust anchors")
    for col in ("fingerprint", "subject", "key", "not after", "signs issuers"):
        anchors.add_column(col)
    for a in info.anchors:
        signing = (
            ("yes" if info.anchor_key_present else "yes (key offline: pki issuer sign)")
            if a.fingerprint == info.signing_anchor
            else "staged (pki anchor activate)"
            if a.fingerprint == info.staged_anchor
            else ""
        )
        anchors.add_row(a.fingerprint[:16], a.subject, a.key_algorithm, _when(a), signing)
    console.print(anchors)
    if info.pending_issuer_key is not None:
        since = info.pending_issuer_key_since
        made = f" since {since:%Y-%m-%d %H:%M} UTC" if since is not None else ""
        console.print(
            f"pending issuer key: {info.pending_issuer_key}, its CSR out for signing{made} "
            "('pki issuer import' the certificate)"
        )
    if info.issuer is None:
        console.print("issuer: none (run 'trustmesh pki issuer create')")
        return
    issuer = info.issuer.certificates[0]
    console.print(_cert_table(issuer, title="issuer"))
    verdict = "verified" if info.issuer.verified else f"NOT verified: {info.issuer.verify_error}"
    console.print(f"issuer chain: {verdict}")
    if info.renew_at is not None:
        console.print(f"renewal: {info.renewal_action} (renewal point {info.renew_at.isoformat()})")
    if info.next_issuer_lifetime is not None:
        console.print(f"next issuer lifetime: {format_duration(info.next_issuer_lifetime)}")


def _print_endpoint(console: Console, info: EndpointInfo) -> None:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("endpoint", info.endpoint)
    table.add_row("server name", info.server_name or "(none)")
    table.add_row("protocol", info.protocol)
    table.add_row("cipher", info.cipher)
    table.add_row("key exchange", info.group or "(unknown)")
    if info.client_certificate:
        table.add_row("client certificate", info.client_certificate)
    console.print(table)
    console.print()
    _print_chain(console, info.chain)


def _print_state(console: Console, state: StoreState, what: str) -> None:
    console.print(f"{what}; store {state.path.parent.parent} is now at version {state.version}")


# --- the group -------------------------------------------------------------------------------


@click.group()
@click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    show_default="$TRUSTMESH_HOME or ~/.local/share/trustmesh",
    help="The credential store.",
)
@click.pass_context
def pki(ctx: click.Context, store: Path | None) -> None:
    """Manage trust anchors, issuers, trust bundles and workload certificates.

    Durations are written 90s, 24h, 30d.
    """
    ctx.obj = _PKIContext(store)


# --- anchors ---------------------------------------------------------------------------------


@pki.group()
def anchor() -> None:
    """Trust anchors (root CAs)."""


@anchor.command("create")
@algorithm_option("ecdsa-p256")
@click.option("--validity", default="365d", show_default=True, callback=_validity)
@click.option(
    "--rotate", is_flag=True, help="Add a new anchor beside the existing one(s); it signs at once."
)
@click.option(
    "--staged",
    is_flag=True,
    help="Rotate in two steps: the new anchor joins the bundle but signs nothing until "
    "'pki anchor activate'.",
)
@click.option(
    "--key-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Keep the anchor's private key out of the store: write it to this new file (0600) "
    "instead. Issuers are then signed with 'pki issuer sign' where the key is, and brought in "
    "with 'pki issuer import'.",
)
@store_option
@output_option
def anchor_create(
    algorithm: KeyAlgorithm,
    validity: timedelta,
    rotate: bool,
    staged: bool,
    key_out: Path | None,
    store: Path | None,
    output: str,
) -> None:
    """Create the trust anchor (or, with --rotate or --staged, a new one that joins the bundle)."""
    fs = _store(store)
    key: PrivateKey | None = None
    if key_out is not None:
        # The key is on disk before the anchor exists: a crash in between leaves a spare key
        # file, never an anchor whose key is lost.
        key = PrivateKey.generate(algorithm)
        try:
            write_new_file(key_out, key.to_pem(), mode=0o600)
        except FileExistsError:
            raise CLIError(
                f"{key_out} exists; an anchor key is only written to a new file", EXIT_USAGE
            ) from None
        except OSError as e:
            raise CLIError(f"cannot write the anchor key to {key_out}: {e.strerror}") from None
    try:
        state = init_anchor(
            fs, now=utcnow(), algorithm=algorithm, lifetime=validity, rotate=rotate,
            stage=staged, key=key, store_key=key is None,
        )  # fmt: skip
    except BaseException:
        if key_out is not None and key is not None and not _anchor_in_store(fs, key):
            key_out.unlink(missing_ok=True)  # refused: no anchor has this key
        raise
    created = state.next_anchor if staged else state.anchor
    assert created is not None and state.bundle is not None
    if output == "json":
        _emit_json(
            {
                "store": str(fs.root),
                "version": state.version,
                "anchor": created.fingerprint,
                "staged": staged,
                "not_after": created.not_after.isoformat(),
                "algorithm": algorithm.value,
                "bundle_digest": state.bundle.digest,
                "bundle_size": len(state.bundle.anchors),
            }
        )
        return
    console = _console()
    what = "staged trust anchor" if staged else "created trust anchor"
    _print_state(console, state, f"{what} {created.fingerprint[:16]}")
    console.print(
        f"algorithm {algorithm.value}, valid until {created.not_after.isoformat()}; "
        f"bundle holds {len(state.bundle.anchors)} anchor(s), digest {state.bundle.digest[:16]}"
    )
    if key_out is not None:
        console.print(
            f"its private key is in {key_out} (0600), not in the store: keep it offline; sign "
            "issuers with 'trustmesh pki issuer sign' and 'trustmesh pki issuer import' them"
        )
    if staged:
        console.print(
            "it signs nothing yet: distribute the bundle, and once every workload holds it "
            "('trustmesh check' shows the proxies' bundles), run 'trustmesh pki anchor activate'"
            + (
                " (with the key offline: 'pki issuer import' of an issuer it signed)"
                if key_out
                else ""
            )
        )


def _anchor_in_store(fs: FileStore, key: PrivateKey) -> bool:
    """Whether the store's bundle holds an anchor with ``key`` (True when it cannot be read:
    a key is only ever deleted when it is certain that nothing depends on it)."""
    try:
        if fs.current_version() is None:
            return False
        bundle = fs.load().bundle
    except (PKIError, OSError):
        return True
    return bundle is not None and any(key.matches(a.x509.public_key()) for a in bundle.anchors)


@anchor.command("activate")
@store_option
@click.option(
    "--proxy",
    "proxies",
    multiple=True,
    metavar="ADMIN_ADDR",
    help="First check that this proxy's admin HOST:PORT reports the bundle with the staged "
    "anchor (repeatable).",
)
@click.option(
    "--identity",
    "identity_admin",
    metavar="ADMIN_ADDR",
    help="First check the identity service's admin HOST:PORT: no identity it certified may "
    "have reported another bundle at its latest renewal.",
)
@admin_timeout_option
@click.option("--force", is_flag=True, help="Activate even when those checks fail.")
@output_option
def anchor_activate(
    store: Path | None,
    proxies: tuple[str, ...],
    identity_admin: str | None,
    timeout: float,
    force: bool,
    output: str,
) -> None:
    """Make the staged anchor the signing anchor, with a new issuer signed by it.

    With --proxy/--identity it first checks that the workloads hold the trust bundle with the
    staged anchor, and refuses (exit 1, naming each one that does not) unless --force. Given
    neither, it checks the proxies of a `trustmesh up` running on the store's home (they are
    all its workloads).
    """
    fs = _store(store)
    before = fs.load()
    previous = before.anchor
    checked: str | None = None
    names: dict[str, str] = {}  # proxy admin address -> workload, for discovered proxies
    if not (proxies or identity_admin) and before.next_anchor is not None:
        from trustmesh.up.home import running_mesh

        running = running_mesh(fs.root)
        if running is not None:
            # Every workload of an 'up' mesh is one of its proxies, which report their bundle
            # now: the identity service's view (as of each one's last renewal) adds nothing.
            names = running.proxies
            proxies = tuple(names)
            _console(err=True).print(
                f"checking the {len(proxies)} proxies of the trustmesh up running on {fs.root} "
                f"(pid {running.pid})",
                markup=False, highlight=False,
            )  # fmt: skip
    if (proxies or identity_admin) and before.next_anchor is not None:
        checked = before.require_bundle().digest
        blockers, warnings = activation_blockers(
            checked,
            [named(probe_admin(p, timeout=timeout, metrics=True), names.get(p)) for p in proxies],
            probe_caller_bundles(identity_admin, timeout=timeout) if identity_admin else None,
        )
        err = _console(err=True)
        for warning in warnings:
            err.print(f"warning: {warning}", markup=False, highlight=False)
        if blockers and not force:
            raise CLIError(
                f"not activating the staged anchor {before.next_anchor.fingerprint[:16]}: not "
                f"every workload holds trust bundle {checked[:16]}: " + "; ".join(blockers)
                + ". Run again once they do, or pass --force."
            )  # fmt: skip
        for blocker in blockers:
            err.print(f"warning (--force): {blocker}", markup=False, highlight=False)
    state = activate_anchor(fs, now=utcnow(), bundle_digest=checked)
    assert state.anchor is not None and state.issuer is not None
    # Until when certificates chaining to the previous anchor may be in use: it stays until then.
    used = anchor_in_use(fs, previous, now=utcnow()) if previous is not None else None
    if output == "json":
        _emit_json(
            {
                "store": str(fs.root),
                "version": state.version,
                "anchor": state.anchor.fingerprint,
                "previous_anchor": previous.fingerprint if previous else None,
                "previous_anchor_in_use_until": used.issuer.not_after.isoformat() if used else None,
                "issuer": state.issuer.certificate.fingerprint,
                "issuer_not_after": state.issuer.certificate.not_after.isoformat(),
            }
        )
        return
    console = _console()
    _print_state(console, state, f"activated trust anchor {state.anchor.fingerprint[:16]}")
    console.print(
        f"new issuer {state.issuer.certificate.fingerprint[:16]} until "
        f"{state.issuer.certificate.not_after.isoformat()}"
        + (
            f"; anchor {previous.fingerprint[:16]} stays trusted: remove it with 'trustmesh pki "
            f"bundle remove {previous.fingerprint[:16]}' once the leaves issued under it have "
            "expired" + (f" (at the latest {used.issuer.not_after.isoformat()})" if used else "")
            if previous is not None
            else ""
        )
    )


# --- issuers ---------------------------------------------------------------------------------


@pki.group()
def issuer() -> None:
    """The issuer (intermediate CA) that signs workload certificates."""


def _report_issuer(fs: FileStore, state: StoreState, what: str, output: str) -> None:
    cred = state.require_issuer()
    if output == "json":
        _emit_json(
            {
                "store": str(fs.root),
                "version": state.version,
                "issuer": cred.certificate.fingerprint,
                "algorithm": cred.certificate.key_algorithm.value,
                "not_after": cred.certificate.not_after.isoformat(),
                "expires": cred.expires.isoformat(),
            }
        )
        return
    console = _console()
    _print_state(console, state, f"{what} issuer {cred.certificate.fingerprint[:16]}")
    console.print(
        f"algorithm {cred.certificate.key_algorithm.value}, "
        f"valid until {cred.certificate.not_after.isoformat()}"
    )


@issuer.command("create")
@algorithm_option("ecdsa-p256")
@click.option("--validity", default="48h", show_default=True, callback=_validity)
@store_option
@output_option
def issuer_create(
    algorithm: KeyAlgorithm, validity: timedelta, store: Path | None, output: str
) -> None:
    """Create the issuer, signed by the store's trust anchor."""
    fs = _store(store)
    state = issue_issuer(fs, now=utcnow(), algorithm=algorithm, lifetime=validity, replace=False)
    _report_issuer(fs, state, "created", output)


@issuer.command("rotate")
@algorithm_option(None)
@click.option("--validity", default=None, callback=_validity, help="Default: the current one's.")
@store_option
@output_option
def issuer_rotate(
    algorithm: KeyAlgorithm | None, validity: timedelta | None, store: Path | None, output: str
) -> None:
    """Replace the issuer now (new key), whatever its renewal point."""
    fs = _store(store)
    fs.load().require_issuer()
    state = issue_issuer(
        fs, now=utcnow(), algorithm=algorithm, lifetime=validity, reason="issuer rotated by hand"
    )
    _report_issuer(fs, state, "rotated to", output)


@issuer.command("show")
@store_option
def issuer_show(store: Path | None) -> None:
    """Print the issuer's certificate chain (PEM, issuer first, no anchor)."""
    click.echo(_store(store).issuer().chain_pem().decode(), nl=False)


@issuer.command("csr")
@algorithm_option(None)
@click.option(
    "--new-key",
    is_flag=True,
    help="Replace the pending key (a CSR already out for signing becomes void).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the CSR (PEM).",
)
@store_option
@output_option
def issuer_csr(
    algorithm: KeyAlgorithm | None, new_key: bool, out: Path, store: Path | None, output: str
) -> None:
    """A CSR for a new issuer, for an anchor whose key is kept offline.

    The issuer's key is made in the store and never leaves it. Sign the CSR where the anchor
    key is ('trustmesh pki issuer sign --csr'), then 'trustmesh pki issuer import CERT' here.
    Run again, it writes the CSR of the same pending key. Default algorithm: the current
    issuer's.
    """
    fs = _store(store)
    state, csr = request_issuer(fs, now=utcnow(), algorithm=algorithm, new_key=new_key)
    write_file_atomic(out, csr, mode=0o644)
    key = state.pending_issuer_key
    assert key is not None
    if output == "json":
        _emit_json(
            {"store": str(fs.root), "version": state.version, "csr": str(out),
             "algorithm": key.algorithm.value}
        )  # fmt: skip
        return
    _console().print(
        f"CSR for a {key.algorithm.value} issuer key (kept in {fs.root}, pending): {out}; sign "
        "it where the anchor key is ('trustmesh pki issuer sign --csr'), then 'trustmesh pki "
        "issuer import' the certificate here"
    )


@issuer.command("sign")
@click.option(
    "--anchor",
    "anchor_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The anchor's certificate (PEM; 'trustmesh pki bundle show' holds it).",
)
@click.option(
    "--anchor-key",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The anchor's private key (PEM), as 'anchor create --key-out' wrote it.",
)
@algorithm_option("ecdsa-p256")
@click.option("--validity", default="48h", show_default=True, callback=_validity)
@click.option(
    "--csr",
    "csr_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Certify the key of this issuer CSR ('pki issuer csr') instead of making a new key.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The issuer's certificate (PEM); without --csr its new key goes to OUT.key (0600).",
)
@output_option
def issuer_sign(
    anchor_file: Path,
    anchor_key: Path,
    algorithm: KeyAlgorithm,
    validity: timedelta,
    csr_file: Path | None,
    out: Path,
    output: str,
) -> None:
    """Sign a new issuer with an anchor whose key is kept offline (no store is used).

    Run it where the anchor key is. With --csr (from 'trustmesh pki issuer csr' on the store's
    machine, whose key never leaves it), then 'trustmesh pki issuer import OUT' there; without,
    a new key is made here: 'trustmesh pki issuer import OUT --key OUT.key'.
    """
    certs = load_pem_chain(read_target(anchor_file))
    if len(certs) != 1:
        raise CLIError(f"{anchor_file} holds {len(certs)} certificates; give the one anchor")
    anchor = Credential(certs[0], _read_key(anchor_key))  # refuses a key that is not this anchor's
    if not anchor.certificate.is_ca:
        raise CLIError(f"{anchor_file} ({anchor.certificate.subject}) is not a CA certificate")
    now = utcnow()
    if csr_file is not None:
        _sign_csr(anchor, read_target(csr_file), csr_file, validity, out, output, now=now)
        return
    issuer = create_issuer(PrivateKey.generate(algorithm), anchor, now=now, lifetime=validity)
    check_can_issue(issuer, TrustBundle((anchor.certificate,)), at=now)
    key_path = out.with_name(out.name + ".key")
    write_files_atomic([(key_path, issuer.key.to_pem(), 0o600), (out, issuer.chain_pem(), 0o644)])
    cert = issuer.certificate
    if output == "json":
        _emit_json(
            {
                "certificate": str(out),
                "key": str(key_path),
                "issuer": cert.fingerprint,
                "anchor": anchor.certificate.fingerprint,
                "not_after": cert.not_after.isoformat(),
                "algorithm": cert.key_algorithm.value,
            }
        )
        return
    _console().print(
        f"issuer {cert.fingerprint[:16]} signed by anchor {anchor.certificate.fingerprint[:16]}, "
        f"valid until {cert.not_after.isoformat()}: {out}, key {key_path} (0600); import both "
        "with 'trustmesh pki issuer import', then delete the key file"
    )


def _sign_csr(
    anchor: Credential,
    data: bytes,
    csr_file: Path,
    validity: timedelta,
    out: Path,
    output: str,
    *,
    now: datetime,
) -> None:
    """``issuer sign --csr``: certify the CSR's key as an issuer; only the certificate is
    written (its key is in the requesting store)."""
    try:
        public_key, _ = validate_ca_csr(data)
    except CSRError as e:
        raise CLIError(f"{csr_file}: {e}") from None
    cert = issuer_certificate(public_key, anchor, now=now, lifetime=validity)
    verify_chain(cert, (), TrustBundle((anchor.certificate,)), at=now)
    write_file_atomic(out, cert.pem, mode=0o644)
    if output == "json":
        _emit_json(
            {
                "certificate": str(out),
                "issuer": cert.fingerprint,
                "anchor": anchor.certificate.fingerprint,
                "not_after": cert.not_after.isoformat(),
                "algorithm": cert.key_algorithm.value,
            }
        )
        return
    _console().print(
        f"issuer {cert.fingerprint[:16]} signed by anchor {anchor.certificate.fingerprint[:16]} "
        f"for the key of {csr_file}, valid until {cert.not_after.isoformat()}: {out}; import it "
        "with 'trustmesh pki issuer import' on the store that wrote the CSR"
    )


def _read_key(path: Path) -> PrivateKey:
    try:
        return PrivateKey.load(path.read_bytes())
    except OSError as e:
        raise CLIError(f"cannot read {path}: {e.strerror}") from None


@issuer.command("import")
@click.argument(
    "cert_file", metavar="CERT", type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--key",
    "key_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The issuer's private key (PEM). Default: the key 'pki issuer csr' keeps pending.",
)
@store_option
@output_option
def issuer_import(cert_file: Path, key_file: Path | None, store: Path | None, output: str) -> None:
    """Install an issuer signed elsewhere ('pki issuer sign' with an offline anchor key).

    It must chain to the store's signing anchor, or to its staged one (which this activates).
    Without --key, its key is the store's pending one ('pki issuer csr').
    """
    chain = load_pem_chain(read_target(cert_file))
    fs = _store(store)
    staged = fs.load().next_anchor
    if key_file is None:
        state = import_issuer_certificate(fs, chain, now=utcnow())
    else:
        key = _read_key(key_file)
        state = import_issuer(fs, Credential(chain[0], key, chain[1:]), now=utcnow())
    activated = staged is not None and state.anchor == staged
    _report_issuer(
        fs, state, "staged anchor activated; imported" if activated else "imported", output
    )


# --- bundles ---------------------------------------------------------------------------------


@pki.group()
def bundle() -> None:
    """The trust bundle: every anchor workloads trust."""


@bundle.command("show")
@store_option
def bundle_show(store: Path | None) -> None:
    """Print the trust bundle (PEM)."""
    click.echo(_store(store).trust_bundle().pem().decode(), nl=False)


def _report_bundle(fs: FileStore, state: StoreState, what: str, output: str) -> None:
    b = state.require_bundle()
    if output == "json":
        _emit_json(
            {
                "store": str(fs.root),
                "version": state.version,
                "bundle_digest": b.digest,
                "anchors": list(b.fingerprints),
            }
        )
        return
    console = _console()
    _print_state(console, state, what)
    console.print(f"bundle: {len(b.anchors)} anchor(s), digest {b.digest}")


@bundle.command("add")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@store_option
@output_option
def bundle_add_cmd(file: Path, store: Path | None, output: str) -> None:
    """Add the CA certificate(s) in FILE (PEM or DER) to the trust bundle."""
    certs = load_certificates(read_target(file))
    fs = _store(store)
    state = bundle_add(fs, b"".join(c.pem for c in certs), now=utcnow())
    _report_bundle(fs, state, f"added {len(certs)} anchor(s)", output)


@bundle.command("remove")
@click.argument("fingerprint")
@click.option(
    "--force",
    is_flag=True,
    help="Remove it even though an issuer still valid chains to it (once every workload has "
    "renewed under the new issuer).",
)
@store_option
@output_option
def bundle_remove_cmd(fingerprint: str, force: bool, store: Path | None, output: str) -> None:
    """Remove the anchor whose SHA-256 fingerprint starts with FINGERPRINT.

    Refused for the signing anchor, for the anchor the current issuer chains to, and, unless
    --force, for one that an issuer still valid chains to (its workload certificates may be in
    use until that issuer's NotAfter).
    """
    fs = _store(store)
    state = bundle_remove(fs, fingerprint.replace(":", ""), now=utcnow(), force=force)
    _report_bundle(fs, state, "removed the anchor", output)


# --- leaves ----------------------------------------------------------------------------------


def _identity(name: str) -> Identity:
    try:
        if name.startswith("spiffe://"):
            return Identity.from_spiffe_id(name)
        return Identity.parse(name)
    except InvalidName as e:
        raise click.BadParameter(str(e), param_hint="'--identity'") from None


@pki.command()
@click.option("--identity", "name", required=True, help="DNS-like identity or SPIFFE ID.")
@click.option(
    "--csr",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Certify the key of this CSR (PEM or DER).",
)
@click.option("--generate", is_flag=True, help="Generate the key; write it to OUT.key (0600).")
@algorithm_option("ecdsa-p256")
@click.option("--validity", default="24h", show_default=True, callback=_validity)
@click.option("--spiffe", is_flag=True, help="Add the SPIFFE ID as a URI SAN.")
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the leaf and its chain (PEM) here.",
)
@store_option
@output_option
def leaf(
    name: str,
    csr: Path | None,
    generate: bool,
    algorithm: KeyAlgorithm,
    validity: timedelta,
    spiffe: bool,
    out: Path,
    store: Path | None,
    output: str,
) -> None:
    """Issue a workload certificate for --identity from the store's issuer."""
    if (csr is None) == (not generate):
        raise click.UsageError("give exactly one of --csr FILE and --generate")
    ident = _identity(name)
    issuer_cred = _store(store).issuer()
    fs_bundle = _store(store).trust_bundle()
    now = utcnow()
    key: PrivateKey | None = None
    if csr is not None:
        validated = validate_csr(
            read_target(csr), expected_name=ident.dns_name, allowed_algorithms=tuple(KeyAlgorithm)
        )
        public_key: object = validated.public_key
    else:
        key = PrivateKey.generate(algorithm)
        public_key = key.public_key()
    cert = issue_leaf(
        public_key,
        ident.dns_name,
        issuer_cred,
        now=now,
        lifetime=validity,
        spiffe_id=ident.spiffe_id if spiffe else None,
        anchor=anchor_for(issuer_cred.full_chain, fs_bundle),
    )
    verify_leaf(cert, issuer_cred.full_chain, fs_bundle, at=now, expected_identity=ident.dns_name)
    key_path = out.with_name(out.name + ".key")
    files = [(out, b"".join(c.pem for c in (cert, *issuer_cred.full_chain)), 0o644)]
    if key is not None:
        Credential(cert, key)  # the key matches the certificate
        files.insert(0, (key_path, key.to_pem(), 0o600))
    write_files_atomic(files)  # both on disk before either replaces the old pair
    if output == "json":
        _emit_json(
            {
                "identity": ident.dns_name,
                "certificate": str(out),
                "key": str(key_path) if key is not None else None,
                "fingerprint": cert.fingerprint,
                "not_after": cert.not_after.isoformat(),
                "algorithm": cert.key_algorithm.value,
            }
        )
        return
    console = _console()
    console.print(f"issued {ident.dns_name} until {cert.not_after.isoformat()} -> {out}")
    if key is not None:
        console.print(f"private key -> {key_path} (0600)")


# --- inspect ---------------------------------------------------------------------------------


def _load_client(cert_file: Path | None, key_file: Path | None) -> Credential | None:
    if cert_file is None and key_file is None:
        return None
    if cert_file is None or key_file is None:
        raise click.UsageError("--client-cert and --client-key go together")
    chain = load_pem_chain(read_target(cert_file))
    return Credential(chain[0], PrivateKey.load(read_target(key_file)), chain[1:])


@pki.command()
@click.argument("target")
@click.option(
    "--ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Verify the chain against the anchors in this PEM file.",
)
@click.option("--servername", help="SNI for HOST:PORT (default: the host).")
@click.option("--client-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--client-key", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--timeout", default="10s", show_default=True, callback=duration_option)
@click.option(
    "--renew-before",
    callback=_validity,
    help="Store targets: renewal policy (default: 1/3 left).",
)
@output_option
def inspect(
    target: str,
    ca: Path | None,
    servername: str | None,
    client_cert: Path | None,
    client_key: Path | None,
    timeout: timedelta,
    renew_before: timedelta | None,
    output: str,
) -> None:
    """Describe TARGET: a PEM/DER certificate file, a store directory, or HOST:PORT (live TLS)."""
    from pki.bundle import TrustBundle

    now = utcnow()
    bundle = TrustBundle.from_pem(read_target(ca)) if ca else None
    path = Path(target)
    result: ChainInfo | StoreInfo | EndpointInfo
    if path.is_dir():
        policy = RenewalPolicy(renew_before=renew_before) if renew_before else None
        result = describe_store(FileStore(path.resolve()), now, policy=policy)
    elif path.exists():
        result = describe_chain(load_certificates(read_target(path)), now, bundle=bundle)
    else:
        endpoint = parse_endpoint(target)
        if endpoint is None:
            raise CLIError(
                f"{target!r} is neither a file, a store directory nor HOST:PORT", EXIT_USAGE
            )
        result = probe_endpoint(
            endpoint,
            now=now,
            timeout=timeout.total_seconds(),
            server_name=servername,
            client=_load_client(client_cert, client_key),
            bundle=bundle,
        )
    if output == "json":
        _emit_json(result.to_dict())
        return
    console = _console()
    if isinstance(result, StoreInfo):
        _print_store(console, result)
    elif isinstance(result, EndpointInfo):
        _print_endpoint(console, result)
    else:
        _print_chain(console, result)


# --- KEM sealing -----------------------------------------------------------------------------


@pki.group("kem")
def kem_group() -> None:
    """Hybrid X25519 + ML-KEM-768 sealing of key material (see README for the format)."""


def _backend_option(f: F) -> F:
    return click.option(
        "--backend",
        type=click.Choice(["cryptography", "liboqs"]),
        default="cryptography",
        show_default=True,
        help="ML-KEM implementation (liboqs only if its shared library is installed).",
    )(f)


def _refuse_overwrite(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise CLIError(f"{path} exists; use --force to replace it", EXIT_USAGE)


@kem_group.command("keygen")
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write OUT.key (private, 0600) and OUT.pub.",
)
@click.option("--force", is_flag=True, help="Replace existing key files.")
@_backend_option
@output_option
def kem_keygen(out: Path, force: bool, backend: str, output: str) -> None:
    """Generate a hybrid KEM key pair."""
    private_path, public_path = out.with_name(out.name + ".key"), out.with_name(out.name + ".pub")
    for p in (private_path, public_path):
        _refuse_overwrite(p, force)
    kem.get_backend(backend)
    public = kem.write_keypair(kem.KEMPrivateKey.generate(), private_path, public_path)
    if output == "json":
        _emit_json(
            {
                "private_key": str(private_path),
                "public_key": str(public_path),
                "key_id": public.key_id.hex(),
            }
        )
        return
    _console().print(
        f"key {public.key_id.hex()}: private -> {private_path} (0600), public -> {public_path}"
    )


@kem_group.command("seal")
@click.option(
    "--to", "to", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Default: FILE.sealed")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@_backend_option
def kem_seal(to: Path, file: Path, out: Path | None, force: bool, backend: str) -> None:
    """Seal FILE to the public key --to PUB."""
    target = out or file.with_name(file.name + ".sealed")
    _refuse_overwrite(target, force)
    recipient = kem.KEMPublicKey.from_armored(read_target(to))
    envelope = kem.seal(read_target(file), recipient, backend=kem.get_backend(backend))
    write_file_atomic(target, envelope, mode=0o600)
    _console().print(f"sealed {file} to key {recipient.key_id.hex()} -> {target}")


@kem_group.command("unseal")
@click.option(
    "--key", "key_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Default: FILE without its .sealed suffix. Written 0600.",
)
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@_backend_option
def kem_unseal(key_file: Path, file: Path, out: Path | None, force: bool, backend: str) -> None:
    """Open FILE with the private key --key PRIV; the plaintext goes to a 0600 file."""
    if out is None:
        if file.suffix != ".sealed":
            raise CLIError(
                f"{file} does not end in .sealed; say where to write with --out", EXIT_USAGE
            )
        out = file.with_suffix("")
    _refuse_overwrite(out, force)
    try:
        private = kem.KEMPrivateKey.from_armored(read_target(key_file))
    except PKIError as e:
        raise CLIError(f"{key_file}: {e}") from None
    plaintext = kem.unseal(read_target(file), private, backend=kem.get_backend(backend))
    write_file_atomic(out, plaintext, mode=0o600)
    _console().print(f"unsealed {file} -> {out} (0600)")
