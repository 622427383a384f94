"""Identity service throughput: certificates per second over gRPC at 1, 8 and 32 callers, beside
in-process issuance (the limit) and Debian's cfssl (``cfssl serve``) signing the same CSRs on
loopback, plus a restart storm of 10,000 distinct identities requesting at once.

Three load generators, so that the client's own cost is visible and can be taken out:

- Python grpc.aio (one channel per caller; cfssl: a minimal asyncio HTTP/1.1 client): every
  request distinct (its own identity, token and P-256 CSR), prepared and serialized before timing.
  It costs ~250 µs of CPU per call on the same two cores as the server.
- the lean client (``grpc_h2_load.py``: pre-encoded HTTP/2 frames, ~50-100 µs per call): the same
  distinct requests, then ("renewals") the shape of TrustMesh's own proxies' renewals: 32
  service accounts, each presenting its one token again with a fresh key and CSR every time, so
  the token check is a cache hit and the CSR's is not. Every answer is checked afterwards to be
  a certificate for the identity asked.
- h2load (nghttp2's C load generator, ~50 µs per call): one request repeated by 32 callers, to
  both servers, same CSR. For the identity service this is the shape of a Linkerd proxy's
  renewals (it makes its key and CSR once and sends them again each time): after the first call
  the token and the CSR's parse and signature check are cache hits, and a leaf is built and
  signed on every call (TrustMesh's own identity client makes a fresh key per renewal: the
  lean client's "renewals" rows). gRPC errors travel in trailers that h2load does
  not read, so the identity rows count failures from the server's own ``/metrics``.

cfssl rows run right after the ``--workers 2`` rows they are compared with, on the same CSRs.
The identity service runs as ``trustmesh identity serve`` subprocesses (plain gRPC, ``--workers 1``
and ``--workers 2``). cfssl checks no token, so it does less work per certificate. All processes
share the machine's cores; server and client CPU per certificate (µs, from /proc, including
worker processes) are the portable figures.

Run: ``.venv/bin/python benchmarks/identity_certify.py`` (about 2 minutes; QUICK=1 for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import grpc_h2_load  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
import psutil  # noqa: E402

from identity.issuer import check_issuer  # noqa: E402
from identity.service import Certifier, IssuancePolicy  # noqa: E402
from identity.validators import Domain, LocalTokenValidator  # noqa: E402
from pki import tokens  # noqa: E402
from pki.certs import Certificate, utcnow  # noqa: E402
from pki.csr import create_csr  # noqa: E402
from pki.keys import PrivateKey  # noqa: E402
from pki.names import Identity  # noqa: E402
from pki.rotation import init_anchor, issue_issuer  # noqa: E402
from pki.store import FileStore  # noqa: E402
from protos import identity_pb2  # noqa: E402

QUICK = os.environ.get("QUICK") == "1"
STORM = 1_000 if QUICK else 10_000
CALLERS = (1, 8, 32)
PER_RUN = {1: 300, 8: 1000, 32: 2000} if QUICK else {1: 1000, 8: 3000, 32: 5000}
H2LOAD_COUNT = 2000 if QUICK else 8000
METHOD = "/io.linkerd.proxy.identity.Identity/Certify"
DOMAIN = Domain("trustmesh", "cluster.local")


@dataclass
class Result:
    name: str
    callers: int
    count: int
    errors: int
    seconds: float
    latencies: list[float]
    server_cpu: float | None  # seconds
    client_cpu: float | None = None  # seconds, the load generator's

    def row(self) -> str:
        rate = self.count / self.seconds
        lat = sorted(self.latencies) or [0.0]
        p50 = lat[len(lat) // 2] * 1000
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000

        def per_cert(cpu: float | None) -> str:
            return f"{cpu / self.count * 1e6:12.0f}" if cpu else "           -"

        return (
            f"{self.name:<36}{self.callers:>8}{self.count:>7}{self.errors:>7}"
            f"{rate:>9.0f}{p50:>9.2f}{p99:>9.2f}{per_cert(self.server_cpu)}"
            f"{per_cert(self.client_cpu)}"
        )


def prepare(store: FileStore, n: int, offset: int) -> list[tuple[str, bytes, bytes]]:
    key = tokens.token_signing_key(store, now=utcnow())
    now = utcnow().replace(microsecond=0)
    out = []
    for i in range(offset, offset + n):
        name = Identity(f"sa-{i}", "bench").dns_name
        claims = tokens.TokenClaims(
            f"system:serviceaccount:bench:sa-{i}", "identity.l5d.io", now, now + timedelta(hours=2)
        )
        out.append((name, tokens.sign_token(claims, key), create_csr(name, PrivateKey.generate())))
    return out


def serialize(reqs: list[tuple[str, bytes, bytes]]) -> list[bytes]:
    return [
        identity_pb2.CertifyRequest(
            identity=n, token=t, certificate_signing_request=c
        ).SerializeToString()
        for n, t, c in reqs
    ]


def process_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of ``pid`` and each of its descendants."""
    proc = psutil.Process(pid)
    out: dict[int, float] = {}
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def tree_cpu(pid: int) -> float:
    return sum(process_cpu(pid).values())


async def in_process(
    store: FileStore, reqs: list[tuple[str, bytes, bytes]], name: str = "in-process Certifier"
) -> Result:
    key = tokens.token_signing_key(store, now=utcnow())
    c = Certifier(IssuancePolicy(), LocalTokenValidator(key, DOMAIN, clock=utcnow), clock=utcnow)
    state = store.load()
    c.set_issuer(
        check_issuer(state.require_issuer(), state.require_bundle(), source="b", at=utcnow())
    )
    lat = []
    cpu0, t0 = time.process_time(), time.perf_counter()
    for r in reqs:
        s = time.perf_counter()
        await c.certify(*r)
        lat.append(time.perf_counter() - s)
    seconds = time.perf_counter() - t0
    return Result(name, 1, len(reqs), 0, seconds, lat, time.process_time() - cpu0)


def renewals(
    reqs: list[tuple[str, bytes, bytes]], accounts: int, count: int | None = None
) -> list[tuple[str, bytes, bytes]]:
    """The renewal shape of TrustMesh's own identity client: ``accounts`` proxies, each
    presenting its one token again with a fresh key and CSR every time (only the token repeats);
    ``count`` requests (default: one per entry of ``reqs``)."""
    out = []
    for i in range(len(reqs) if count is None else count):
        name, token, _ = reqs[i % accounts]
        out.append((name, token, create_csr(name, PrivateKey.generate())))
    return out


def start_server(store: FileStore, workers: int) -> tuple[subprocess.Popen[str], int, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "trustmesh", "identity", "serve", "--store", str(store.root),
         "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--workers", str(workers)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if len(line) < 3:
        proc.kill()
        raise SystemExit("identity serve did not start")
    return proc, int(line[2]), int(line[4])


def stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def grpc_run(
    name: str, port: int, pid: int, payloads: list[bytes], callers: int, channels: int
) -> Result:
    opts = [("grpc.use_local_subchannel_pool", 1)]
    chans = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) for _ in range(channels)]
    calls = [ch.unary_unary(METHOD) for ch in chans]
    for call in calls:  # connect every channel before timing
        await call(payloads[0], timeout=10)
    work = iter(payloads[1:])
    lat: list[float] = []
    errors = 0

    async def caller(i: int) -> None:
        nonlocal errors
        call = calls[i % len(calls)]
        for p in work:
            s = time.perf_counter()
            try:
                await call(p, timeout=60)
            except grpc.aio.AioRpcError:
                errors += 1
            lat.append(time.perf_counter() - s)

    cpu0, own0, t0 = tree_cpu(pid), time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(callers)))
    seconds = time.perf_counter() - t0
    cpu, own = tree_cpu(pid) - cpu0, time.process_time() - own0
    for ch in chans:
        await ch.close()
    return Result(name, callers, len(payloads) - 1, errors, seconds, lat, cpu, own)


# --- cfssl -------------------------------------------------------------------------------------


def start_cfssl(work: Path, store: FileStore) -> tuple[subprocess.Popen[bytes], int] | None:
    if shutil.which("cfssl") is None:
        return None
    state = store.load()
    issuer = state.require_issuer()
    (work / "ca.pem").write_bytes(issuer.certificate.pem)
    (work / "ca-key.pem").write_bytes(_sec1(issuer.key))
    os.chmod(work / "ca-key.pem", 0o600)
    (work / "config.json").write_text(json.dumps({"signing": {"default": {
        "expiry": "24h", "usages": ["digital signature", "server auth", "client auth"]}}}))  # fmt: skip
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        ["cfssl", "serve", "-address", "127.0.0.1", "-port", str(port), "-ca", str(work / "ca.pem"),
         "-ca-key", str(work / "ca-key.pem"), "-config", str(work / "config.json")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    return None


def _sec1(key: PrivateKey) -> bytes:
    """cfssl 1.2 reads 'EC PRIVATE KEY' (SEC1); convert from PKCS#8 with the openssl CLI."""
    out = subprocess.run(["openssl", "ec"], input=key.to_pem(), capture_output=True, check=True)
    return out.stdout


async def cfssl_run(port: int, pid: int, pems: list[bytes], callers: int) -> Result:
    work = iter(pems)
    lat: list[float] = []
    errors = 0

    async def caller() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for pem in work:
                body = json.dumps({"certificate_request": pem.decode()}).encode()
                s = time.perf_counter()
                writer.write(
                    b"POST /api/v1/cfssl/sign HTTP/1.1\r\nHost: cfssl\r\n"
                    b"Content-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode() + b"\r\n\r\n" + body
                )  # fmt: skip
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1]) for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )  # fmt: skip
                payload = json.loads(await reader.readexactly(length))
                lat.append(time.perf_counter() - s)
                if not payload.get("success"):
                    errors += 1
        finally:
            writer.close()

    cpu0, own0, t0 = tree_cpu(pid), time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    seconds = time.perf_counter() - t0
    own = time.process_time() - own0
    return Result(
        "cfssl serve (Go), py client", callers, len(pems), errors, seconds, lat,
        tree_cpu(pid) - cpu0, own,
    )  # fmt: skip


def to_pem(der: bytes) -> bytes:
    """DER CSR to PEM (64-column base64 between the PKCS#10 armour lines)."""
    b64 = base64.b64encode(der).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    body = "\n".join(
        ["-----BEGIN CERTIFICATE REQUEST-----", *lines, "-----END CERTIFICATE REQUEST-----"]
    )
    return (body + "\n").encode()


async def storm(port: int, pid: int, payloads: list[bytes]) -> Result:
    """Every request issued at once, spread over 64 connections (~156 calls in flight on each);
    the server must answer every one (it raises grpc's limit on calls waiting for a handler)."""
    opts = [("grpc.use_local_subchannel_pool", 1)]
    chans = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) for _ in range(64)]
    calls = [ch.unary_unary(METHOD) for ch in chans]
    await asyncio.gather(*(c(payloads[0], timeout=10) for c in calls))
    lat: list[float] = []
    errors = 0

    async def one(i: int, p: bytes) -> None:
        nonlocal errors
        s = time.perf_counter()
        try:
            await calls[i % 64](p, timeout=60)
        except grpc.aio.AioRpcError:
            errors += 1
        lat.append(time.perf_counter() - s)

    cpu0, own0, t0 = tree_cpu(pid), time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(payloads[1:])))
    seconds = time.perf_counter() - t0
    cpu, own = tree_cpu(pid) - cpu0, time.process_time() - own0
    for ch in chans:
        await ch.close()
    n = len(payloads) - 1
    return Result(f"storm: {n} ids at once, py client", n, n, errors, seconds, lat, cpu, own)


async def lean_run(
    name: str, port: int, pid: int, reqs: list[tuple[str, bytes, bytes]], conns: int, in_flight: int
) -> Result:
    """Distinct requests through :mod:`grpc_h2_load`; every answer is then checked to be a
    certificate for the identity that was asked for (outside the timed section)."""
    payloads = serialize(reqs)
    cpu0, own0 = tree_cpu(pid), time.process_time()
    out = await grpc_h2_load.run(
        "127.0.0.1", port, METHOD, payloads, connections=conns, in_flight=in_flight
    )
    cpu, own = tree_cpu(pid) - cpu0, time.process_time() - own0
    asked = {n for n, _, _ in reqs}
    got: set[str] = set()
    for r in out.responses:
        leaf = identity_pb2.CertifyResponse.FromString(r).leaf_certificate
        got.update(Certificate.from_der(leaf).dns_names)
    errors = out.errors + len(asked - got)
    callers = conns * in_flight if in_flight * conns < len(reqs) else len(reqs)
    return Result(name, callers, len(reqs), errors, out.seconds, out.latencies, cpu, own)


# --- h2load (C load generator) ------------------------------------------------------------


def h2load(
    name: str, url: str, body: bytes, callers: int, count: int, pid: int, extra: list[str]
) -> Result:
    """``count`` POSTs of ``body`` by ``callers`` connections (one request in flight on each)."""
    with tempfile.TemporaryDirectory(prefix="tm-h2load-") as tmp:
        data, log = Path(tmp) / "body", Path(tmp) / "log"
        data.write_bytes(body)
        usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)  # h2load is the child waited for
        cpu0, t0 = tree_cpu(pid), time.perf_counter()
        subprocess.run(
            ["h2load", "-n", str(count), "-c", str(callers), "-m", "1", "-d", str(data),
             f"--log-file={log}", *extra, url],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        cpu = tree_cpu(pid) - cpu0
        usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        rows = [line.split("\t") for line in log.read_text().splitlines() if line]
    client = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    failed = sum(1 for r in rows if not r[1].startswith("2")) + count - len(rows)
    lat = [int(r[2]) / 1e6 for r in rows]
    return Result(name, callers, count, failed, seconds, lat, cpu, client)


def grpc_h2load(name: str, port: int, admin: int, pid: int, payload: bytes, count: int) -> Result:
    """h2load against Certify; failures counted from the server's ``/metrics`` (gRPC errors
    are in trailers, which h2load does not read)."""
    before = _issued_ok(admin)
    frame = b"\0" + struct.pack(">I", len(payload)) + payload  # gRPC message: flag, length
    grpc_headers = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    url = f"http://127.0.0.1:{port}{METHOD}"
    result = h2load(name, url, frame, 32, count, pid, grpc_headers)
    deadline = time.monotonic() + 5  # worker counters reach /metrics every 0.5 s
    ok = _issued_ok(admin) - before
    while ok < count and time.monotonic() < deadline:
        time.sleep(0.2)
        ok = _issued_ok(admin) - before
    result.errors = max(result.errors, count - ok)
    return result


def _issued_ok(admin: int) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    found = re.search(r'^identity_issuance_total\{result="ok"\} (\S+)$', text, re.MULTILINE)
    return int(float(found.group(1))) if found else 0


async def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="tm-bench-identity-"))
    store = FileStore(work / "store")
    init_anchor(store, now=utcnow())
    issue_issuer(store, now=utcnow())
    total = 2 * STORM + 1 + (sum(PER_RUN.values()) + PER_RUN[32] + 4 + 32) * 2 + 2000
    print(f"preparing {total} distinct identities, tokens and CSRs ...", file=sys.stderr)
    reqs = prepare(store, total, 0)
    cursor = 0

    def take(n: int) -> list[tuple[str, bytes, bytes]]:
        nonlocal cursor
        cursor += n
        return reqs[cursor - n : cursor]

    results: list[Result] = [
        await in_process(store, take(1000)),
        await in_process(store, renewals(take(1000), 32), "in-process, token reused (32 SAs)"),
    ]
    spread = ""
    procs: list[subprocess.Popen[Any]] = []
    try:
        # cfssl waits idle beside the identity service, and each cfssl row runs right after the
        # --workers 2 row it is compared with, on the same CSRs, so that the other sessions'
        # load on this shared machine drifts as little as possible between the two.
        cf = start_cfssl(work, store)
        if cf is None:
            print("cfssl not installed: skipping the cfssl rows", file=sys.stderr)
        else:
            procs.append(cf[0])
        for workers in (1, 2):
            proc, port, admin = start_server(store, workers)
            procs.append(proc)
            name = f"gRPC, {workers} proc, py client"
            for callers in CALLERS:
                batch = take(PER_RUN[callers] + 1)
                results.append(
                    await grpc_run(name, port, proc.pid, serialize(batch), callers, callers)
                )
                if workers == 2 and cf is not None:
                    pems = [to_pem(c) for _, _, c in batch[1:]]
                    results.append(await cfssl_run(cf[1], cf[0].pid, pems, callers))
            results.append(await lean_run(f"gRPC, {workers} proc, lean client", port, proc.pid,
                                          take(PER_RUN[32]), 32, 1))  # fmt: skip
            results.append(await lean_run(f"gRPC, {workers} proc, lean client, renewals", port,
                                          proc.pid, renewals(take(32), 32, PER_RUN[32]), 32, 1))  # fmt: skip
            one = serialize(take(1))[0]
            split0 = process_cpu(proc.pid)
            results.append(grpc_h2load(f"gRPC, {workers} proc, h2load", port, admin, proc.pid,
                                       one, H2LOAD_COUNT))  # fmt: skip
            if workers == 2:
                split = {k: v - split0.get(k, 0.0) for k, v in process_cpu(proc.pid).items()}
                busy = sum(split.values()) or 1.0
                spread = " / ".join(f"{v / busy:.0%}" for v in split.values() if v > 0.01 * busy)
                if cf is not None:
                    pem = to_pem(one_csr(one)).decode()
                    body = json.dumps({"certificate_request": pem}).encode()
                    url = f"http://127.0.0.1:{cf[1]}/api/v1/cfssl/sign"
                    json_header = ["--h1", "-H", "content-type: application/json"]
                    results.append(h2load("cfssl serve (Go), h2load", url, body, 32,
                                          H2LOAD_COUNT, cf[0].pid, json_header))  # fmt: skip
                results.append(await storm(port, proc.pid, serialize(take(STORM + 1))))
                results.append(await lean_run(f"storm: {STORM} ids at once, lean client", port,
                                              proc.pid, take(STORM), 64, STORM))  # fmt: skip
            stop(proc)
    finally:
        for p in procs:
            if p.poll() is None:
                stop(p)
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nmachine: {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f} "
          f"(load generator shares the cores)")  # fmt: skip
    print(f"{'server, load generator':<36}{'callers':>8}{'certs':>7}{'errors':>7}{'certs/s':>9}"
          f"{'p50 ms':>9}{'p99 ms':>9}{'srv µs/cert':>12}{'cli µs/cert':>12}")  # fmt: skip
    for r in results:
        print(r.row())
    if spread:
        print(f"--workers 2 under h2load: server CPU split over its processes {spread}")
    rate = {(r.name, r.callers): r.count / r.seconds for r in results}

    def best(suffix: str) -> float:
        return max(v for (n, c), v in rate.items() if c == 32 and n.startswith("gRPC")
                   and n.endswith(suffix))  # fmt: skip

    distinct = max(best("py client"), best("lean client"))

    print("\ntargets:")
    for client, cf_name in (("distinct requests", "cfssl serve (Go), py client"),
                            ("renewals", "cfssl serve (Go), py client"),
                            ("h2load", "cfssl serve (Go), h2load")):  # fmt: skip
        got = distinct if client == "distinct requests" else best(client)
        verdict = "met" if got >= 2500 else "NOT met"
        print(f"  >= 2,500 certs/s at 32 callers ({client}): {got:.0f} -> {verdict}")
        cf32 = rate.get((cf_name, 32))
        if cf32:
            print(f"  not slower than cfssl at 32 ({client}): {got:.0f} vs {cf32:.0f} -> "
                  f"{'met' if got >= cf32 else 'NOT met'}")  # fmt: skip
    for storm_r in (r for r in results if r.name.startswith("storm")):
        ok = storm_r.seconds <= 5 and storm_r.errors == 0
        print(f"  {storm_r.name} drained <= 5 s, 0 errors: {storm_r.seconds:.2f} s, "
              f"{storm_r.errors} errors -> {'met' if ok else 'NOT met'}")  # fmt: skip


def one_csr(payload: bytes) -> bytes:
    return identity_pb2.CertifyRequest.FromString(payload).certificate_signing_request


if __name__ == "__main__":
    argparse.ArgumentParser(  # --help only: a typo must not start two minutes of load
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="environment: QUICK=1 for a smoke run (1,000-identity storm, fewer requests)",
    ).parse_args()
    # `timeout` and supervisors stop with SIGTERM: exit through the finally blocks, which stop
    # every server started here, instead of leaving them running into the next measurement.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    asyncio.run(main())
