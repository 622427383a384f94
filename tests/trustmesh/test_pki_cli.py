"""``trustmesh pki``: the commands end to end, through click and as a real process.

Chains made here are checked by the system ``openssl verify`` and served by ``openssl s_server``
(Debian's OpenSSL 3.0, a real independent peer).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pki.certs import load_pem_chain
from pki.csr import create_csr
from pki.keys import KeyAlgorithm, PrivateKey
from trustmesh.cli import cli
from trustmesh.errors import run_cli

WEB = "web.default.serviceaccount.identity.trustmesh.cluster.local"
TRUSTMESH = Path(sys.executable).parent / "trustmesh"
OPENSSL = shutil.which("openssl") or ""


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def tm(*args: str | Path, env: dict[str, str] | None = None) -> Run:
    """Run the CLI in-process through the same error boundary as the console script."""
    runner = CliRunner()
    with runner.isolation(env=env) as (out, err, _):
        code = run_cli(cli, [str(a) for a in args])
    return Run(code, out.getvalue().decode(), err.getvalue().decode())


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A store with an ECDSA anchor and issuer, made by the CLI."""
    root = tmp_path / "store"
    assert tm("pki", "--store", root, "anchor", "create").code == 0
    assert tm("pki", "--store", root, "issuer", "create").code == 0
    return root


def test_default_store_comes_from_trustmesh_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    r = tm("pki", "anchor", "create", "-o", "json", env={"TRUSTMESH_HOME": str(home)})
    assert r.code == 0, r.err
    assert r.json()["store"] == str(home)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


@pytest.mark.skipif(not OPENSSL, reason="openssl is not installed")
def test_openssl_verifies_cli_made_ecdsa_chain(store: Path, tmp_path: Path) -> None:
    leaf = tmp_path / "leaf.pem"
    r = tm("pki", "leaf", "--store", store, "--identity", WEB, "--generate", "--out", leaf)
    assert r.code == 0, r.err
    (tmp_path / "bundle.pem").write_text(tm("pki", "--store", store, "bundle", "show").out)
    (tmp_path / "issuer.pem").write_text(tm("pki", "--store", store, "issuer", "show").out)
    # the leaf file is leaf + chain; openssl verifies the first certificate in it
    out = subprocess.run(
        [OPENSSL, "verify", "-CAfile", "bundle.pem", "-untrusted", "issuer.pem", "leaf.pem"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "leaf.pem: OK"
    key = tmp_path / "leaf.pem.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert PrivateKey.load(key.read_bytes()).algorithm is KeyAlgorithm.ECDSA_P256
    # and it refuses a chain from another anchor
    other = tmp_path / "other"
    tm("pki", "--store", other, "anchor", "create")
    (tmp_path / "other.pem").write_text(tm("pki", "--store", other, "bundle", "show").out)
    bad = subprocess.run(
        [OPENSSL, "verify", "-CAfile", "other.pem", "-untrusted", "issuer.pem", "leaf.pem"],
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert bad.returncode != 0


def test_leaf_from_csr(store: Path, tmp_path: Path) -> None:
    key = PrivateKey.generate()
    csr = tmp_path / "web.csr"
    csr.write_bytes(create_csr(WEB, key))
    out = tmp_path / "web.pem"
    r = tm(
        "pki", "leaf", "--store", store, "--identity", WEB, "--csr", csr, "--out", out, "-o", "json"
    )
    assert r.code == 0, r.err
    assert r.json()["key"] is None and not (tmp_path / "web.pem.key").exists()
    info = tm("pki", "inspect", out, "-o", "json").json()
    assert info["certificates"][0]["dns_names"] == [WEB]
    assert len(info["certificates"]) == 2  # leaf + issuer


def test_leaf_refuses_a_csr_for_another_identity(store: Path, tmp_path: Path) -> None:
    csr = tmp_path / "api.csr"
    csr.write_bytes(create_csr(WEB.replace("web", "api"), PrivateKey.generate()))
    r = tm(
        "pki", "leaf", "--store", store, "--identity", WEB, "--csr", csr, "--out", tmp_path / "x"
    )
    assert r.code == 1
    assert r.err.count("\n") == 1 and "requested identity" in r.err
    assert not (tmp_path / "x").exists()


def test_leaf_refuses_a_p384_csr(store: Path, tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, WEB)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(WEB)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "p384.csr"
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    r = tm(
        "pki", "leaf", "--store", store, "--identity", WEB, "--csr", path, "--out", tmp_path / "x"
    )
    assert r.code == 1 and "P-256" in r.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--identity", WEB, "--out", "x"], "exactly one of --csr FILE and --generate"),
        (["--identity", "web", "--generate", "--out", "x"], "not of the form"),
        (["--identity", WEB, "--generate", "--validity", "soon", "--out", "x"], "invalid duration"),
        (["--identity", WEB, "--generate", "--algorithm", "rsa", "--out", "x"], "rsa"),
        (["--identity", WEB, "--generate", "--validity", "0s", "--out", "x"], "must be positive"),
        (["--identity", WEB, "--generate", "--validity", "99999999d", "--out", "x"], "36500d"),
    ],
)
def test_leaf_usage_errors(store: Path, args: list[str], message: str) -> None:
    r = tm("pki", "leaf", "--store", store, *args)
    assert r.code == 2
    assert message in r.err


def test_mldsa_store_and_spiffe_leaf(tmp_path: Path) -> None:
    root = tmp_path / "pq"
    assert tm("pki", "--store", root, "anchor", "create", "--algorithm", "ml-dsa-65").code == 0
    r = tm(
        "pki", "--store", root, "issuer", "create", "--algorithm", "ml-dsa-65", "--validity", "90s"
    )
    assert r.code == 0, r.err
    r = tm(
        "pki", "--store", root, "leaf", "--identity", "spiffe://cluster.local/ns/default/sa/web",
        "--generate", "--algorithm", "ml-dsa-65", "--spiffe", "--out", tmp_path / "web.pem",
    )  # fmt: skip
    assert r.code == 0, r.err
    info = tm("pki", "inspect", tmp_path / "web.pem", "-o", "json").json()
    leaf = info["certificates"][0]
    assert leaf["key_algorithm"] == "ml-dsa-65"
    assert leaf["dns_names"] == [WEB]
    assert leaf["uris"] == ["spiffe://cluster.local/ns/default/sa/web"]
    # the 24h leaf is clamped to the 90s issuer
    assert leaf["not_after"] == info["certificates"][1]["not_after"]


def test_issuer_create_twice_and_rotate(store: Path) -> None:
    r = tm("pki", "--store", store, "issuer", "create")
    assert r.code == 1 and "issuer rotate" in r.err
    before = tm("pki", "inspect", store, "-o", "json").json()["issuer"]
    r = tm("pki", "--store", store, "issuer", "rotate", "-o", "json")
    assert r.code == 0, r.err
    after = tm("pki", "inspect", store, "-o", "json").json()
    new = after["issuer"]["certificates"][0]
    assert new["fingerprint_sha256"] == r.json()["issuer"]
    assert new["fingerprint_sha256"] != before["certificates"][0]["fingerprint_sha256"]
    assert after["issuer"]["verified"] is True
    assert after["renewal"]["action"] == "wait"


def test_issuer_without_anchor(tmp_path: Path) -> None:
    r = tm("pki", "--store", tmp_path / "empty", "issuer", "create")
    assert r.code == 1 and "anchor create" in r.err
    r = tm("pki", "--store", tmp_path / "empty", "issuer", "show")
    assert r.code == 1 and r.out == ""


def test_anchor_rotation_and_bundle_commands(store: Path, tmp_path: Path) -> None:
    r = tm("pki", "--store", store, "anchor", "create")
    assert r.code == 1 and "--rotate" in r.err
    first = tm("pki", "inspect", store, "-o", "json").json()
    old_fp = first["anchors"][0]["fingerprint_sha256"]
    r = tm("pki", "--store", store, "anchor", "create", "--rotate", "-o", "json")
    assert r.code == 0 and r.json()["bundle_size"] == 2
    new_fp = r.json()["anchor"]
    # the signing anchor cannot be removed; the old one can
    r = tm("pki", "--store", store, "bundle", "remove", new_fp[:12])
    assert r.code == 1 and "signs the current issuer" in r.err
    # the old anchor still anchors the current issuer: refused until the issuer is replaced
    r = tm("pki", "--store", store, "bundle", "remove", old_fp[:12])
    assert r.code == 1 and "issuer rotate" in r.err
    assert tm("pki", "--store", store, "issuer", "rotate").code == 0
    # the issuer just replaced chains to it and is still valid, as may be the leaves it signed
    r = tm("pki", "--store", store, "bundle", "remove", old_fp[:12])
    assert r.code == 1 and f"refusing to remove anchor {old_fp[:16]}: issuer " in r.err
    assert "or with --force once every workload has renewed" in r.err
    r = tm("pki", "--store", store, "bundle", "remove", old_fp[:12], "--force", "-o", "json")
    assert r.code == 0 and r.json()["anchors"] == [new_fp]
    # add a foreign anchor from a file (DER this time)
    other = tmp_path / "other"
    tm("pki", "--store", other, "anchor", "create")
    der = tmp_path / "other.der"
    from pki.certs import Certificate

    der.write_bytes(
        Certificate.from_pem(tm("pki", "--store", other, "bundle", "show").out.encode()).der
    )
    r = tm("pki", "--store", store, "bundle", "add", der, "-o", "json")
    assert r.code == 0 and len(r.json()["anchors"]) == 2
    assert tm("pki", "--store", store, "bundle", "show").out.count("BEGIN CERTIFICATE") == 2
    r = tm("pki", "--store", store, "bundle", "add", der)
    assert r.code == 1 and "already in the bundle" in r.err


def test_inspect_targets_and_errors(store: Path, tmp_path: Path) -> None:
    r = tm("pki", "inspect", store)
    assert r.code == 0 and "bundle digest" in r.out and "renewal" in r.out
    r = tm("pki", "inspect", "no-such-thing")
    assert r.code == 2 and "neither a file" in r.err
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(os.urandom(300))
    r = tm("pki", "inspect", garbage)
    assert r.code == 1 and r.err.startswith("error: ") and r.err.count("\n") == 1


@pytest.fixture
def s_server(store: Path, tmp_path: Path) -> Iterator[int]:
    """``openssl s_server`` serving a CLI-made ECDSA leaf + issuer on 127.0.0.1 (TLS 1.3)."""
    if not OPENSSL:
        pytest.skip("openssl is not installed")
    leaf = tmp_path / "srv.pem"
    tm("pki", "--store", store, "leaf", "--identity", WEB, "--generate", "--out", leaf)
    proc = subprocess.Popen(
        [
            OPENSSL,
            "s_server",
            "-accept",
            "127.0.0.1:0",
            "-cert",
            leaf,
            "-key",
            f"{leaf}.key",
            "-cert_chain",
            leaf,
            "-tls1_3",
            "-naccept",
            "1",
        ],
        # s_server quits when its stdin reaches EOF, so it gets a pipe that stays open
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        port = None
        assert proc.stdout is not None
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            m = re.match(r"ACCEPT 127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
            if not line and proc.poll() is not None:
                break
        assert port is not None, "openssl s_server did not start"
        yield port
    finally:
        proc.kill()
        proc.wait(timeout=10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def test_inspect_live_endpoint(s_server: int, store: Path, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text(tm("pki", "--store", store, "bundle", "show").out)
    r = tm("pki", "inspect", f"127.0.0.1:{s_server}", "--ca", ca, "-o", "json")
    assert r.code == 0, r.err
    info = r.json()
    assert info["protocol"] == "TLSv1.3"
    # Debian's OpenSSL 3.0 has no ML-KEM, so the hybrid group cannot be chosen by this peer
    assert info["group"].lower() == "x25519"
    assert info["chain"]["certificates"][0]["dns_names"] == [WEB]
    assert info["chain"]["verified"] is True


def test_kem_keygen_seal_unseal(tmp_path: Path) -> None:
    secret = tmp_path / "issuer.key"
    secret.write_bytes(PrivateKey.generate().to_pem())
    r = tm("pki", "kem", "keygen", "--out", tmp_path / "cluster", "-o", "json")
    assert r.code == 0, r.err
    assert "PRIVATE" not in r.out
    assert stat.S_IMODE((tmp_path / "cluster.key").stat().st_mode) == 0o600
    assert tm("pki", "kem", "keygen", "--out", tmp_path / "cluster").code == 2
    r = tm("pki", "kem", "seal", "--to", tmp_path / "cluster.pub", secret)
    assert r.code == 0, r.err
    sealed = tmp_path / "issuer.key.sealed"
    assert secret.read_bytes() not in sealed.read_bytes()
    r = tm("pki", "kem", "unseal", "--key", tmp_path / "cluster.key", sealed)
    assert r.code == 2 and "exists" in r.err  # would overwrite issuer.key
    opened = tmp_path / "opened.key"
    r = tm("pki", "kem", "unseal", "--key", tmp_path / "cluster.key", sealed, "--out", opened)
    assert r.code == 0, r.err
    assert opened.read_bytes() == secret.read_bytes()
    assert stat.S_IMODE(opened.stat().st_mode) == 0o600
    assert "PRIVATE KEY" not in r.out


def test_kem_refusals(tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert tm("pki", "kem", "keygen", "--out", tmp_path / name).code == 0
    payload = tmp_path / "p"
    payload.write_bytes(b"payload")
    tm("pki", "kem", "seal", "--to", tmp_path / "a.pub", payload)
    sealed = tmp_path / "p.sealed"
    r = tm("pki", "kem", "unseal", "--key", tmp_path / "b.key", sealed, "--out", tmp_path / "o")
    assert r.code == 1 and "wrong key" in r.err
    data = bytearray(sealed.read_bytes())
    data[-3] ^= 1
    sealed.write_bytes(bytes(data))
    r = tm("pki", "kem", "unseal", "--key", tmp_path / "a.key", sealed, "--out", tmp_path / "o")
    assert r.code == 1 and "tampered" in r.err
    assert not (tmp_path / "o").exists()
    r = tm("pki", "kem", "unseal", "--key", tmp_path / "a.pub", sealed, "--out", tmp_path / "o")
    assert r.code == 1 and "public key" in r.err
    r = tm(
        "pki", "kem", "seal", "--to", tmp_path / "a.pub", payload, "--backend", "liboqs", "--force"
    )
    if not _has_liboqs():
        assert r.code == 1 and "liboqs shared library is not installed" in r.err


def _has_liboqs() -> bool:
    import ctypes.util

    return ctypes.util.find_library("oqs") is not None


def test_real_process_errors_and_success(tmp_path: Path) -> None:
    """The installed console script: one line on stderr and exit 1; JSON on success."""
    assert TRUSTMESH.exists(), f"{TRUSTMESH} is missing; run make (pip install -e .)"
    env = {**os.environ, "TRUSTMESH_HOME": str(tmp_path / "home")}
    bad = subprocess.run(
        [TRUSTMESH, "pki", "issuer", "show"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1
    assert bad.stdout == ""
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    assert "Traceback" not in bad.stderr
    ok = subprocess.run(
        [TRUSTMESH, "pki", "anchor", "create", "--validity", "30d", "-o", "json"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["store"] == str(tmp_path / "home")
    usage = subprocess.run(
        [TRUSTMESH, "pki", "anchor", "create", "--validity", "1y"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert usage.returncode == 2 and "invalid duration" in usage.stderr


def test_leaf_killed_before_it_replaces_the_pair_leaves_the_old_pair(
    store: Path, tmp_path: Path
) -> None:
    # A real process, SIGKILLed once the new key and certificate are on disk under temporary
    # names: the old pair is untouched and still matches; the re-run replaces both and removes
    # the dead run's temporary files (the key's was 0600 all along).
    leaf = tmp_path / "leaf.pem"
    args = ["pki", "leaf", "--store", str(store), "--identity", WEB, "--generate", "--out"]
    assert tm(*args, leaf).code == 0
    old_cert, old_key = leaf.read_bytes(), (tmp_path / "leaf.pem.key").read_bytes()
    env = {**os.environ, "TRUSTMESH_CRASH_AT": "files-staged"}
    crashed = subprocess.run(
        [str(TRUSTMESH), *args, str(leaf)], env=env, capture_output=True, timeout=60, check=False
    )
    assert crashed.returncode == -9, crashed.stderr.decode()
    assert leaf.read_bytes() == old_cert
    assert (tmp_path / "leaf.pem.key").read_bytes() == old_key
    staged = sorted(p for p in tmp_path.iterdir() if ".tmp-" in p.name)
    assert [p.name.split(".tmp-")[0] for p in staged] == [".leaf.pem.key", ".leaf.pem"]
    assert stat.S_IMODE(staged[0].stat().st_mode) == 0o600
    rerun = subprocess.run(
        [str(TRUSTMESH), *args, str(leaf)], capture_output=True, timeout=60, check=False
    )
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    cert = load_pem_chain(leaf.read_bytes())[0]
    key = PrivateKey.load((tmp_path / "leaf.pem.key").read_bytes())
    assert cert.fingerprint != load_pem_chain(old_cert)[0].fingerprint
    assert key.matches(cert.x509.public_key())


def _openssl_verifies(store: Path, leaf: Path, anchors_pem: bytes, work: Path) -> bool:
    """The system openssl's verdict on ``leaf`` (a leaf + chain file) against ``anchors_pem``."""
    (work / "anchors.pem").write_bytes(anchors_pem)
    (work / "issuer.pem").write_text(tm("pki", "--store", store, "issuer", "show").out)
    out = subprocess.run(
        [OPENSSL, "verify", "-CAfile", "anchors.pem", "-untrusted", "issuer.pem", str(leaf)],
        cwd=work,
        capture_output=True,
        timeout=30,
        check=False,
    )
    return out.returncode == 0


@pytest.mark.skipif(not OPENSSL, reason="openssl is not installed")
def test_staged_anchor_rotation_end_to_end(store: Path, tmp_path: Path) -> None:
    old_bundle = tm("pki", "--store", store, "bundle", "show").out.encode()
    before = tm("pki", "inspect", store, "-o", "json").json()
    # stage: the bundle grows; the signing anchor and the issuer stay
    staged = tm("pki", "--store", store, "anchor", "create", "--staged", "-o", "json")
    assert staged.code == 0, staged.err
    new = staged.json()["anchor"]
    assert staged.json()["staged"] is True and staged.json()["bundle_size"] == 2
    during = tm("pki", "inspect", store, "-o", "json").json()
    assert during["staged_anchor"] == new
    assert during["signing_anchor"] == before["signing_anchor"] != new
    fingerprints = [c["fingerprint_sha256"] for c in before["issuer"]["certificates"]]
    assert [c["fingerprint_sha256"] for c in during["issuer"]["certificates"]] == fingerprints
    assert "staged (pki anchor activate)" in tm("pki", "inspect", store).out
    again = tm("pki", "--store", store, "anchor", "create", "--staged")
    assert again.code != 0 and "already staged" in again.err
    # while staged, a workload that has not received the new bundle yet still verifies
    # the certificates issued meanwhile: that is the point of the first step
    leaf = tmp_path / "leaf.pem"
    args = ("pki", "leaf", "--store", store, "--identity", WEB, "--generate", "--out", leaf)
    assert tm(*args).code == 0
    assert _openssl_verifies(store, leaf, old_bundle, tmp_path)
    # activate: the staged anchor signs, through a new issuer
    active = tm("pki", "--store", store, "anchor", "activate", "-o", "json")
    assert active.code == 0, active.err
    assert active.json()["anchor"] == new
    assert active.json()["previous_anchor"] == before["signing_anchor"]
    after = tm("pki", "inspect", store, "-o", "json").json()
    assert after["signing_anchor"] == new and after["staged_anchor"] is None
    assert after["issuer"]["verified"] and after["bundle_digest"] == during["bundle_digest"]
    assert tm("pki", "--store", store, "anchor", "activate").code != 0  # nothing staged now
    # leaves issued now verify against the distributed bundle, never against the old one alone
    assert tm(*args).code == 0
    new_bundle = tm("pki", "--store", store, "bundle", "show").out.encode()
    assert _openssl_verifies(store, leaf, new_bundle, tmp_path)
    assert not _openssl_verifies(store, leaf, old_bundle, tmp_path)
    # the old anchor can leave the bundle once the leaves of the issuer replaced have expired
    # (at the latest at that issuer's NotAfter, which activation names), or with --force
    in_use_until = active.json()["previous_anchor_in_use_until"]
    issuer_before = before["issuer"]["certificates"][0]
    assert in_use_until == issuer_before["not_after"], (in_use_until, issuer_before)
    old_anchor = before["signing_anchor"][:16]
    refused = tm("pki", "--store", store, "bundle", "remove", old_anchor)
    assert refused.code == 1 and "is valid until" in refused.err
    removed = tm("pki", "--store", store, "bundle", "remove", old_anchor, "--force")
    assert removed.code == 0, removed.err


@pytest.mark.skipif(not OPENSSL, reason="openssl is not installed")
def test_offline_anchor_key_sign_and_import(tmp_path: Path) -> None:
    """The anchor key never enters the store: issuers are signed where the key is and
    imported; the leaves they sign pass the system openssl."""
    root, key = tmp_path / "store", tmp_path / "offline" / "anchor.key"
    key.parent.mkdir()
    made = tm("pki", "--store", root, "anchor", "create", "--key-out", key)
    assert made.code == 0, made.err
    assert key.stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in key.read_bytes()
    files = {p.name for p in (root / "current").iterdir()}
    assert "anchor.key" not in files and "anchor.pem" in files
    assert b"PRIVATE KEY" not in b"".join(p.read_bytes() for p in (root / "current").iterdir())
    refused = tm("pki", "--store", root, "issuer", "create")
    assert refused.code == 1 and "'trustmesh pki issuer sign --csr'" in refused.err
    anchor_pem = tmp_path / "offline" / "anchor.pem"
    anchor_pem.write_text(tm("pki", "--store", root, "bundle", "show").out)
    out = tmp_path / "offline" / "issuer.pem"
    signed = tm("pki", "issuer", "sign", "--anchor", anchor_pem, "--anchor-key", key,
                "--validity", "30d", "--out", out, "-o", "json")  # fmt: skip
    assert signed.code == 0, signed.err
    issuer_key = Path(signed.json()["key"])
    assert issuer_key == out.with_name("issuer.pem.key")
    assert issuer_key.stat().st_mode & 0o777 == 0o600
    imported = tm("pki", "--store", root, "issuer", "import", out, "--key", issuer_key,
                  "-o", "json")  # fmt: skip
    assert imported.code == 0, imported.err
    assert imported.json()["issuer"] == signed.json()["issuer"]
    leaf = tmp_path / "web.pem"
    assert (
        tm("pki", "leaf", "--store", root, "--identity", WEB, "--generate", "--out", leaf).code == 0
    )
    assert _openssl_verifies(root, leaf, anchor_pem.read_bytes(), tmp_path)
    view = tm("pki", "inspect", root)
    assert "yes (key offline: pki issuer sign)" in view.out
    assert tm("pki", "inspect", root, "-o", "json").json()["anchor_key_present"] is False


def _offline_anchor(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A store whose anchor key is kept offline: (store, anchor PEM, anchor key)."""
    root, key = tmp_path / "store", tmp_path / "offline" / "anchor.key"
    key.parent.mkdir(parents=True)
    assert tm("pki", "--store", root, "anchor", "create", "--key-out", key).code == 0
    anchor_pem = tmp_path / "offline" / "anchor.pem"
    anchor_pem.write_text(tm("pki", "--store", root, "bundle", "show").out)
    return root, anchor_pem, key


def _csr_key(path: Path) -> bytes:
    csr = x509.load_pem_x509_csr(path.read_bytes())
    return csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.skipif(not OPENSSL, reason="openssl is not installed")
def test_an_issuer_csr_keeps_the_issuer_key_in_the_store(tmp_path: Path) -> None:
    """With an offline anchor, the issuer's key is made in the store and only its CSR and
    certificate travel: the key was never in a file outside the store."""
    root, anchor_pem, anchor_key = _offline_anchor(tmp_path)
    req = tmp_path / "issuer.csr"
    made = tm("pki", "--store", root, "issuer", "csr", "--out", req, "-o", "json")
    assert made.code == 0, made.err
    pending = root / "current" / "pending-issuer.key"
    assert pending.stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" not in req.read_bytes() and b"CERTIFICATE REQUEST" in req.read_bytes()
    again = tmp_path / "again.csr"
    assert tm("pki", "--store", root, "issuer", "csr", "--out", again).code == 0
    assert _csr_key(again) == _csr_key(req)  # the same pending key, no new version
    view = tm("pki", "inspect", root, "-o", "json").json()
    assert view["version"] == made.json()["version"]
    assert view["pending_issuer_key"] == "ecdsa-p256"
    assert view["pending_issuer_key_since"] == view["created"]  # made by the current version
    assert "pending issuer key: ecdsa-p256, its CSR out for signing since " in (
        tm("pki", "inspect", root).out
    )
    cert = tmp_path / "offline" / "issuer.pem"
    signed = tm("pki", "issuer", "sign", "--anchor", anchor_pem, "--anchor-key", anchor_key,
                "--csr", req, "--validity", "30d", "--out", cert, "-o", "json")  # fmt: skip
    assert signed.code == 0, signed.err
    assert sorted(p.name for p in cert.parent.iterdir()) == [
        "anchor.key", "anchor.pem", "issuer.pem"
    ]  # fmt: skip
    imported = tm("pki", "--store", root, "issuer", "import", cert, "-o", "json")
    assert imported.code == 0, imported.err
    assert imported.json()["issuer"] == signed.json()["issuer"]
    files = {p.name for p in (root / "current").iterdir()}
    assert "pending-issuer.key" not in files and "issuer.key" in files
    after = tm("pki", "inspect", root, "-o", "json").json()
    assert after["pending_issuer_key"] is None and after["pending_issuer_key_since"] is None
    store_key = serialization.load_pem_private_key(
        (root / "current" / "issuer.key").read_bytes(), None
    )
    assert store_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == _csr_key(req)
    leaf = tmp_path / "web.pem"
    assert (
        tm("pki", "leaf", "--store", root, "--identity", WEB, "--generate", "--out", leaf).code == 0
    )
    assert _openssl_verifies(root, leaf, anchor_pem.read_bytes(), tmp_path)


def test_issuer_csr_refusals(tmp_path: Path) -> None:
    root, anchor_pem, anchor_key = _offline_anchor(tmp_path)
    cert = tmp_path / "issuer.pem"
    # No pending key and no --key: said, nothing written.
    lone = tmp_path / "lone.pem"
    other_root = _offline_anchor(tmp_path / "elsewhere")[0]
    other_req = tmp_path / "other.csr"
    assert tm("pki", "--store", other_root, "issuer", "csr", "--out", other_req).code == 0
    assert tm("pki", "issuer", "sign", "--anchor", anchor_pem, "--anchor-key", anchor_key,
              "--csr", other_req, "--out", lone).code == 0  # fmt: skip
    before = tm("pki", "inspect", root, "-o", "json").json()["version"]
    none = tm("pki", "--store", root, "issuer", "import", lone)
    assert none.code == 1 and "no issuer key is pending" in none.err
    # A certificate for another store's key (here: the other store's CSR) is refused.
    req = tmp_path / "issuer.csr"
    assert tm("pki", "--store", root, "issuer", "csr", "--out", req).code == 0
    version = tm("pki", "inspect", root, "-o", "json").json()["version"]
    assert version == before + 1
    foreign = tm("pki", "--store", root, "issuer", "import", lone)
    assert foreign.code == 1 and "is not for the pending issuer key" in foreign.err
    # A CSR whose signature does not verify is refused, and nothing is written.
    tampered = tmp_path / "tampered.csr"
    der = bytearray(
        x509.load_pem_x509_csr(req.read_bytes()).public_bytes(serialization.Encoding.DER)
    )
    der[-3] ^= 0x01  # inside the signature
    tampered.write_bytes(bytes(der))
    bad = tm("pki", "issuer", "sign", "--anchor", anchor_pem, "--anchor-key", anchor_key,
             "--csr", tampered, "--out", cert)  # fmt: skip
    assert bad.code == 1 and "signature does not verify" in bad.err, bad.err
    assert not cert.exists()
    # --new-key voids the CSR out for signing: its certificate no longer imports.
    assert tm("pki", "issuer", "sign", "--anchor", anchor_pem, "--anchor-key", anchor_key,
              "--csr", req, "--out", cert).code == 0  # fmt: skip
    switched = tm("pki", "--store", root, "issuer", "csr", "--algorithm", "ml-dsa-65",
                  "--out", tmp_path / "mldsa.csr")  # fmt: skip
    assert switched.code == 1 and "pass --new-key" in switched.err
    renewed = tm("pki", "--store", root, "issuer", "csr", "--new-key", "--out", tmp_path / "n.csr")
    assert renewed.code == 0, renewed.err
    void = tm("pki", "--store", root, "issuer", "import", cert)
    assert void.code == 1 and "is not for the pending issuer key" in void.err
    assert tm("pki", "inspect", root, "-o", "json").json()["version"] == version + 1
    assert "issuer.key" not in {p.name for p in (root / "current").iterdir()}


def test_key_out_never_overwrites_and_goes_when_the_anchor_is_refused(
    store: Path, tmp_path: Path
) -> None:
    existing = tmp_path / "existing.key"
    existing.write_bytes(b"keep me")
    clash = tm("pki", "--store", tmp_path / "new", "anchor", "create", "--key-out", existing)
    assert clash.code == 2 and f"{existing} exists" in clash.err
    assert existing.read_bytes() == b"keep me"
    assert not (tmp_path / "new" / "current").exists()
    # the store has an anchor: without --rotate the new one is refused, and so is its key file
    orphan = tmp_path / "orphan.key"
    refused = tm("pki", "--store", store, "anchor", "create", "--key-out", orphan)
    assert refused.code == 1 and "already has a trust anchor" in refused.err
    assert not orphan.exists()


def test_issuer_sign_and_import_refusals(store: Path, tmp_path: Path) -> None:
    anchor_pem = tmp_path / "anchor.pem"
    anchor_pem.write_text(tm("pki", "--store", store, "bundle", "show").out)
    stranger = tmp_path / "stranger.key"
    stranger.write_bytes(PrivateKey.generate().to_pem())
    out = tmp_path / "issuer.pem"
    wrong_key = tm("pki", "issuer", "sign", "--anchor", anchor_pem, "--anchor-key", stranger,
                   "--out", out)  # fmt: skip
    assert wrong_key.code == 1 and "does not match" in wrong_key.err
    assert not out.exists() and not out.with_name("issuer.pem.key").exists()
    (tmp_path / "two.pem").write_text(anchor_pem.read_text() * 2)
    two = tm("pki", "issuer", "sign", "--anchor", tmp_path / "two.pem", "--anchor-key", stranger,
             "--out", out)  # fmt: skip
    assert two.code == 1 and "holds 2 certificates" in two.err
    # an issuer signed by another installation's anchor is refused by the store
    other = tmp_path / "other"
    other_key = tmp_path / "other-anchor.key"
    assert tm("pki", "--store", other, "anchor", "create", "--key-out", other_key).code == 0
    other_pem = tmp_path / "other-anchor.pem"
    other_pem.write_text(tm("pki", "--store", other, "bundle", "show").out)
    assert tm("pki", "issuer", "sign", "--anchor", other_pem, "--anchor-key", other_key,
              "--out", out).code == 0  # fmt: skip
    before = tm("pki", "inspect", store, "-o", "json").json()["version"]
    foreign = tm("pki", "--store", store, "issuer", "import", out, "--key",
                 out.with_name("issuer.pem.key"))  # fmt: skip
    assert foreign.code == 1 and "is not signed by any of the 1 anchor(s)" in foreign.err
    mismatched = tm("pki", "--store", store, "issuer", "import", out, "--key", stranger)
    assert mismatched.code == 1 and "does not match" in mismatched.err
    assert tm("pki", "inspect", store, "-o", "json").json()["version"] == before


def test_an_os_error_is_said_as_file_and_reason(tmp_path: Path) -> None:
    # It was Python's "[Errno 20] Not a directory: '.../store'".
    (tmp_path / "file").write_text("")
    r = tm("pki", "--store", tmp_path / "file" / "store", "anchor", "create")
    assert r.code == 1
    assert r.err == f"error: {tmp_path / 'file' / 'store'}: Not a directory\n"
