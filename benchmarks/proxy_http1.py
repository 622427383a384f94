"""HTTP/1.1 through TrustMesh's proxies vs direct vs haproxy, side by side in one run.

Paths (wrk, HTTP/1.1 keep-alive, small GET; backend = single-threaded haproxy `http-request
return`, so the backend costs the same everywhere):

  direct      wrk -> backend
  trustmesh   wrk -> outbound proxy -> mesh TLS 1.3 (X25519MLKEM768, mTLS) -> inbound proxy -> backend
  haproxy     wrk -> haproxy -> TLS 1.3 mTLS (OpenSSL 3.0: X25519) -> haproxy -> backend

Reported per path: max requests/s (wrk -c16, best of interleaved rounds), CPU microseconds
per request per hop (user + system, from /proc via psutil; median of the rounds), unloaded
latency (wrk -c1), and latency at a fixed rate of half the TrustMesh maximum. The fixed rate is
open-loop (``paced_load.c``, compiled into the run's temporary directory, or the Python
``paced_load`` below when no C compiler works; either runs in its own process, and its own CPU
per request is printed): requests are scheduled at evenly spaced
times (1/rate apart, nanosecond timers) over 16 keep-alive connections, and each latency is
measured from the request's *scheduled* time, so a slow path cannot lower the rate it is
tested at and queueing behind a busy connection counts. wrk cannot do this: its ``delay()``
hook waits per connection after each response (closed loop) in whole milliseconds, which
sends bursts of ~rate/1000 requests at once. The achieved rate is printed for every path;
direct, TrustMesh and
haproxy. Added latency per hop = (path - direct) / 2. For TrustMesh also the proxies' RSS
idle and while holding 1,000 open client connections, and the h11 vs httptools codec cost.
Every process started here is stopped by PID at the end. Run: .venv/bin/python benchmarks/proxy_http1.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pki.bundle import TrustBundle  # noqa: E402
from pki.certs import Credential, create_anchor, create_issuer, issue_identity  # noqa: E402
from pki.keys import KeyAlgorithm, PrivateKey  # noqa: E402
from pki.names import Identity  # noqa: E402

DURATION = int(os.environ.get("BENCH_SECONDS", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CONNS = 16
RATE_CONNS = 16  # fixed-rate run: enough connections that one is always free at a send slot
REQUEST = b"GET / HTTP/1.1\r\nHost: api\r\n\r\n"  # what wrk sends with -H "Host: api"

PROCS: list[subprocess.Popen[str]] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(args: list[str], **kw: Any) -> subprocess.Popen[str]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    PROCS.append(proc)
    return proc


def stop_all() -> None:
    for proc in reversed(PROCS):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def make_pki(tmp: Path) -> dict[str, str]:
    now = datetime.now(UTC)
    akey = PrivateKey.generate(KeyAlgorithm.ECDSA_P256)
    anchor = create_anchor(akey, now=now, lifetime=timedelta(days=2))
    issuer = create_issuer(
        PrivateKey.generate(KeyAlgorithm.ECDSA_P256), Credential(anchor, akey), now=now
    )
    (tmp / "bundle.pem").write_bytes(TrustBundle.of([anchor]).pem())
    ids = {}
    for sa in ("web", "api"):
        key = PrivateKey.generate(KeyAlgorithm.ECDSA_P256)
        cred = issue_identity(Identity(sa, "bench"), key, issuer, now=now)
        (tmp / f"{sa}.crt").write_bytes(cred.chain_pem())
        (tmp / f"{sa}.key").write_bytes(key.to_pem())
        (tmp / f"{sa}.key").chmod(0o600)
        # haproxy wants certificate and key in one file
        (tmp / f"{sa}.haproxy.pem").write_bytes(cred.chain_pem() + key.to_pem())
        ids[sa] = Identity(sa, "bench").dns_name
    return ids


def haproxy(cfg: str, tmp: Path, name: str) -> subprocess.Popen[str]:
    path = tmp / f"{name}.cfg"
    path.write_text(cfg)
    return start(["haproxy", "-db", "-f", str(path)])


GLOBAL = "global\n  nbthread 1\n  maxconn 4000\ndefaults\n  mode http\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n  http-reuse always\n"


def run_wrk(port: int, conns: int, duration: int) -> dict[str, float]:
    args = ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "-H", "Host: api"]
    out = subprocess.run(
        [*args, f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=duration + 30
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        assert m is not None, out
        value = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
        lat[pct] = value
    return {"rps": rps, "total": total, "p50": lat["50"], "p99": lat["99"],
            "errors": int(errors.group(1)) if errors else 0}  # fmt: skip


def paced_load(port: int, rate: float, duration: float, conns: int) -> dict[str, float]:
    """Open-loop HTTP/1.1 load at ``rate`` requests/s; latency from each scheduled send time."""
    socks = []
    for _ in range(conns):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(sock)
    # Warm up: one request on every connection at once, so the proxies' pooled mesh connections
    # (and their handshakes) exist before the schedule starts.
    for sock in socks:
        sock.send(REQUEST)
    for sock in socks:
        sock.settimeout(10)
        got = b""
        while not got.endswith(b"ok"):  # the backend's whole, fixed response ends with its body
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("the server closed a benchmark connection")
            got += chunk
        sock.setblocking(False)
    idle = list(socks)
    due: dict[socket.socket, int] = {}  # busy connection -> scheduled time of its request
    partial = {sock: b"" for sock in socks}
    clock = time.perf_counter_ns
    interval = int(1e9 / rate)
    slot = start = clock() + 50_000_000
    end = start + int(duration * 1e9)
    backlog: deque[int] = deque()  # scheduled while every connection was busy
    latencies: list[int] = []
    errors = 0
    while slot < end or due or backlog:
        now = clock()
        while slot <= now and slot < end:
            backlog.append(slot)
            slot += interval
        while backlog and idle:
            sock = idle.pop()
            due[sock] = backlog.popleft()
            sock.send(REQUEST)
        timeout = max(0.0, (slot - clock()) / 1e9) if slot < end else 1.0
        # select() takes a microsecond timeout (epoll's is whole milliseconds)
        ready, _, _ = select.select(list(due), [], [], timeout)
        for sock in ready:
            data = sock.recv(65536)
            if not data:
                raise RuntimeError("the server closed a benchmark connection")
            got = partial[sock] + data
            head_end = got.find(b"\r\n\r\n")
            length = 0
            if head_end >= 0:
                m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", got[:head_end])
                length = int(m.group(1)) if m else 0
            if head_end < 0 or len(got) < head_end + 4 + length:
                partial[sock] = got
                continue
            partial[sock] = b""
            errors += not got.startswith(b"HTTP/1.1 2")
            latencies.append(clock() - due.pop(sock))
            idle.append(sock)
    for sock in socks:
        sock.close()
    latencies.sort()
    n = len(latencies)
    return {"rps": n / duration, "total": n, "p50": latencies[n // 2] / 1e6,
            "p99": latencies[int(n * 0.99)] / 1e6, "errors": errors}  # fmt: skip


def build_generator(tmp: Path) -> Path | None:
    """Compile ``paced_load.c`` into ``tmp``; None (and why, printed) if that is not possible."""
    cc = shutil.which("cc")
    if cc is None:
        print("no C compiler (cc) found")
        return None
    exe = tmp / "paced_load"
    src = Path(__file__).with_name("paced_load.c")
    built = subprocess.run(
        [cc, "-O2", "-Wall", "-Wextra", "-o", str(exe), str(src)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if built.returncode != 0:
        print(f"compiling {src.name} failed:\n{built.stderr}")
        return None
    return exe


def run_paced(
    port: int, pids: list[int], rate: float, duration: int, generator: Path | None
) -> dict[str, float]:
    """The open-loop load in a child process (``generator``, or ``paced_load`` in Python when
    None), with the proxies' CPU use, CPU per request, and run-queue wait (runnable but no CPU
    free) per request, and the generator's own CPU per request."""
    if generator is not None:
        args: list[str | bytes] = [str(generator), str(port), str(rate), str(duration),
                                   str(RATE_CONNS), REQUEST]  # fmt: skip
    else:
        args = [sys.executable, __file__, "--paced", str(port), str(rate), str(duration),
                str(RATE_CONNS)]  # fmt: skip
    before, waited = cpu_seconds(pids), run_queue_seconds(pids)
    gen_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60)
    gen_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    after, waited = cpu_seconds(pids), run_queue_seconds(pids) - waited
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed ({done.returncode}): {done.stderr.strip()}")
    r: dict[str, float] = json.loads(done.stdout)
    gen_user = gen_after.ru_utime - gen_before.ru_utime
    r["gen_us"] = (gen_user + gen_after.ru_stime - gen_before.ru_stime) / r["total"] * 1e6
    hops = max(1, len(pids))
    r["cpu_pct"] = (sum(after) - sum(before)) / hops / duration * 100.0
    r["cpu_us"] = (sum(after) - sum(before)) / r["total"] * 1e6 / hops
    r["wait_us"] = waited / r["total"] * 1e6 / hops
    return r


def run_queue_seconds(pids: list[int]) -> float:
    """Seconds ``pids`` spent runnable but waiting for a CPU (/proc/PID/schedstat), 0 if unknown."""
    total = 0.0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            pass
    return total


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pids`` together."""
    user = system = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        user += t.user
        system += t.system
    return user, system


def measured_run(port: int, pids: list[int], conns: int, duration: int) -> dict[str, float]:
    """One wrk run, with the CPU the path's proxies used per request per hop."""
    before = cpu_seconds(pids)
    r = run_wrk(port, conns, duration)
    after = cpu_seconds(pids)
    hops = max(1, len(pids))
    r["user_us"] = (after[0] - before[0]) / r["total"] * 1e6 / hops
    r["sys_us"] = (after[1] - before[1]) / r["total"] * 1e6 / hops
    r["cpu_us_per_req_per_hop"] = r["user_us"] + r["sys_us"]
    # busiest-case share of one core per proxy during the run
    r["cpu_pct"] = (sum(after) - sum(before)) / hops / duration * 100.0
    return r


def pin(layout: dict[int, int] | None, pids: list[int]) -> None:
    """Pin every thread of each process in ``layout`` (pid -> CPU) to that CPU; with None, let
    every thread of ``pids`` run on any CPU again."""
    every = set(range(os.cpu_count() or 1))
    for pid in pids:
        cpus = every if layout is None else {layout[pid]}
        for task in Path(f"/proc/{pid}/task").iterdir():
            os.sched_setaffinity(int(task.name), cpus)


def fixed_rate_rounds(
    paths: dict[str, tuple[int, list[int]]], rate: float, generator: Path | None
) -> dict[str, dict[str, float]]:
    """Every path at ``rate``, ROUNDS interleaved rounds; each figure's median."""
    paced: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
    for _ in range(ROUNDS):
        for name, (port, pids) in paths.items():
            paced[name].append(run_paced(port, pids, rate, DURATION, generator))
    return {name: medians(runs) for name, runs in paced.items()}


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over ``runs`` (the achieved rate: the lowest)."""
    out = {key: median([r[key] for r in runs]) for key in runs[0]}
    out["rps"] = min(r["rps"] for r in runs)
    return out


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def cpu_pressure() -> str:
    """Linux PSI ``some avg60`` for the CPU, e.g. "12.5%" ("n/a" without /proc/pressure)."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return "n/a"
    m = re.search(r"avg60=([\d.]+)", line)
    return f"{m.group(1)}%" if m else "n/a"


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


async def hold_connections(port: int, count: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
        writers.append((reader, writer))
    for reader, _ in writers:
        await asyncio.wait_for(reader.readuntil(b"ok"), 30)
    return [w for _, w in writers]


def codec_bench() -> dict[str, float]:
    """Parse one request and one response and rebuild the request head: µs per exchange."""
    import httptools

    req = b"GET /index.html HTTP/1.1\r\nHost: api\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok"

    class Sink:
        def __init__(self) -> None:
            self.headers: list[tuple[bytes, bytes]] = []

        def on_header(self, n: bytes, v: bytes) -> None:
            self.headers.append((n, v))

    def with_httptools() -> None:
        s = Sink()
        p = httptools.HttpRequestParser(s)
        p.feed_data(req)
        b"".join(n + b": " + v + b"\r\n" for n, v in s.headers)
        httptools.HttpResponseParser(Sink()).feed_data(resp)

    results = {}
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        with_httptools()
    results["httptools"] = (time.perf_counter() - t0) / n * 1e6
    try:
        import h11
    except ImportError:
        return results

    def with_h11() -> None:
        server = h11.Connection(h11.SERVER)
        server.receive_data(req)
        event = server.next_event()
        assert isinstance(event, h11.Request)
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method=event.method, target=event.target, headers=event.headers))
        client.send(h11.EndOfMessage())
        client.receive_data(resp)
        while not isinstance(client.next_event(), h11.EndOfMessage):
            pass

    n = 3000
    t0 = time.perf_counter()
    for _ in range(n):
        with_h11()
    results["h11"] = (time.perf_counter() - t0) / n * 1e6
    return results


FIXED_MODES = {
    "default": "scheduling: the kernel's default (every process may run on either core)",
    "pinned": "scheduling: each path's outbound proxy pinned to CPU 0 and inbound proxy to CPU 1 "
    "(every thread; the same for haproxy); backend and generator unpinned",
}


def print_fixed(fixed: dict[str, dict[str, float]], rate: float) -> None:
    print(
        f"{'path':<11} {'achieved':>9} {'p50 ms':>8} {'p99 ms':>8} {'+p50/hop ms':>12} {'+p99/hop ms':>12} {'proxy CPU %':>12} {'CPU µs/req/hop':>15} {'run-queue wait µs/req/hop':>26} {'generator CPU µs/req':>21}"
    )
    d = fixed["direct"]
    for name, r in fixed.items():
        proxied = name != "direct"
        add50 = (r["p50"] - d["p50"]) / 2 if proxied else 0.0
        add99 = (r["p99"] - d["p99"]) / 2 if proxied else 0.0
        cpu = f"{r['cpu_pct']:.0f}" if proxied else "-"
        per_req = f"{r['cpu_us']:.1f}" if proxied else "-"
        wait = f"{r['wait_us']:.1f}" if proxied else "-"
        print(
            f"{name:<11} {r['rps']:>9.0f} {r['p50']:>8.3f} {r['p99']:>8.3f} {add50:>12.3f} {add99:>12.3f} {cpu:>12} {per_req:>15} {wait:>26} {r['gen_us']:>21.1f}"
        )
    short = [n for n, r in fixed.items() if r["rps"] < 0.95 * rate]
    if short:
        print(f"!! below 95% of the target rate: {', '.join(short)}")


def main() -> int:
    for tool in ("wrk", "haproxy"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (Debian package {tool}); cannot benchmark")
            return 1
    load_before = os.getloadavg()[0], cpu_pressure()
    tmp = Path(tempfile.mkdtemp(prefix="tm-bench-"))
    ids = make_pki(tmp)
    results: dict[str, dict[str, float]] = {}
    generator = build_generator(tmp)
    try:
        backend = free_port()
        haproxy(
            GLOBAL
            + f"frontend be\n  bind 127.0.0.1:{backend}\n  http-request return status 200 content-type text/plain string ok\n",
            tmp,
            "backend",
        )
        # TrustMesh: two proxy processes.
        zero = {"host": "127.0.0.1", "port": 0}
        api_cfg = {"identity": ids["api"], "credentials": {"chain": "api.crt", "key": "api.key", "bundle": "bundle.pem"},
                   "outbound": zero, "admin": zero, "inbound": {**zero, "ports": [backend]}}  # fmt: skip
        (tmp / "api.json").write_text(json.dumps(api_cfg))
        api = start([sys.executable, "-m", "proxy", "--config", str(tmp / "api.json")], cwd=ROOT)
        inbound = json.loads(api.stdout.readline())["inbound"]  # type: ignore[union-attr]
        web_cfg = {"identity": ids["web"], "credentials": {"chain": "web.crt", "key": "web.key", "bundle": "bundle.pem"},
                   "outbound": zero, "admin": zero, "inbound": zero,
                   "routes": {"services": [{"name": "api", "endpoints": [
                       {"host": "127.0.0.1", "port": backend, "identity": ids["api"], "proxy_port": inbound}]}]}}  # fmt: skip
        (tmp / "web.json").write_text(json.dumps(web_cfg))
        web = start([sys.executable, "-m", "proxy", "--config", str(tmp / "web.json")], cwd=ROOT)
        web_ports = json.loads(web.stdout.readline())  # type: ignore[union-attr]
        outbound = web_ports["outbound"]
        # haproxy two-hop mTLS.
        hb_port, ha_port = free_port(), free_port()
        haproxy(
            GLOBAL
            + f"frontend in\n  bind 127.0.0.1:{hb_port} ssl crt {tmp}/api.haproxy.pem ca-file {tmp}/bundle.pem verify required ssl-min-ver TLSv1.3\n  default_backend app\nbackend app\n  server s 127.0.0.1:{backend}\n",
            tmp,
            "hap_in",
        )
        haproxy(
            GLOBAL
            + f"frontend out\n  bind 127.0.0.1:{ha_port}\n  default_backend mesh\nbackend mesh\n  server s 127.0.0.1:{hb_port} ssl crt {tmp}/web.haproxy.pem ca-file {tmp}/bundle.pem verify required sni str({ids['api']}) ssl-min-ver TLSv1.3\n",
            tmp,
            "hap_out",
        )
        for port in (backend, outbound, ha_port):
            wait_port(port)
        hap_pids = [PROCS[-1].pid, PROCS[-2].pid]  # outbound, inbound
        paths = {
            "direct": (backend, []),
            "trustmesh": (outbound, [web.pid, api.pid]),
            "haproxy": (ha_port, hap_pids),
        }
        idle_rss = {"outbound": rss_mib(web.pid), "inbound": rss_mib(api.pid)}
        for _name, (port, _) in paths.items():  # warm up connections and pools
            run_wrk(port, CONNS, 1)
        # Max throughput, interleaved rounds: best req/s, median CPU per request.
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
        for _ in range(ROUNDS):
            for name, (port, pids) in paths.items():
                rounds[name].append(measured_run(port, pids, CONNS, DURATION))
        for name, runs in rounds.items():
            best = max(runs, key=lambda x: x["rps"])
            results[name] = {
                **best,
                **{k: median([r[k] for r in runs]) for k in ("cpu_us_per_req_per_hop", "user_us", "sys_us")},
            }  # fmt: skip
        # Unloaded: one connection, one request at a time.
        # The VM is shared: every latency figure is the median of interleaved rounds.
        c1: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
        for _ in range(ROUNDS):
            for name, (port, _) in paths.items():
                c1[name].append(run_wrk(port, 1, max(2, DURATION // 2)))
        unloaded = {name: medians(runs) for name, runs in c1.items()}
        # Fixed rate: half the TrustMesh maximum, the same open-loop schedule on every path.
        rate = results["trustmesh"]["rps"] / 2
        fixed = {"default": fixed_rate_rounds(paths, rate, generator)}
        # The same again with each path's two proxies pinned, one per core (as haproxy's
        # cpu-map or a Kubernetes static CPU policy would): outbound on CPU 0, inbound on 1.
        proxies = [web.pid, api.pid, *hap_pids]
        if (os.cpu_count() or 1) >= 2:
            pin({web.pid: 0, api.pid: 1, hap_pids[0]: 0, hap_pids[1]: 1}, proxies)
            fixed["pinned"] = fixed_rate_rounds(paths, rate, generator)
            pin(None, proxies)

        # RSS with 1,000 open client connections through the mesh.
        async def hold() -> tuple[float, float]:
            writers = await hold_connections(outbound, 1000)
            await asyncio.sleep(0.5)
            sizes = rss_mib(web.pid), rss_mib(api.pid)
            for w in writers:
                w.close()
            return sizes

        held = asyncio.run(hold())
        codecs = codec_bench()
    finally:
        stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"\nHTTP/1.1 small GET, wrk -t1 -c{CONNS} -d{DURATION}s, {ROUNDS} interleaved rounds (best req/s, "
        "median CPU); 2 cores shared by wrk, backend and proxies\n"
    )
    print(
        f"{'path':<11} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU µs/req/hop':>15} {'(user':>7} {'sys)':>6} {'non-2xx':>8}"
    )
    for name, r in results.items():
        print(
            f"{name:<11} {r['rps']:>9.0f} {r['p50']:>8.3f} {r['p99']:>8.3f} {r['cpu_us_per_req_per_hop']:>15.1f} {r['user_us']:>7.1f} {r['sys_us']:>6.1f} {r['errors']:>8.0f}"
        )
    tm, hp = results["trustmesh"], results["haproxy"]
    per_core = 1e6 / tm["cpu_us_per_req_per_hop"]
    print(f"\ntrustmesh: {per_core:,.0f} req/s per core per hop (target ≥ 15,000); "
          f"CPU vs haproxy {tm['cpu_us_per_req_per_hop'] / hp['cpu_us_per_req_per_hop']:.2f}x (target ≤ 1.5x)")  # fmt: skip
    d1 = unloaded["direct"]
    print(f"\nunloaded (wrk -c1, medians of {ROUNDS} rounds): " + ", ".join(
        f"{n} p50 {r['p50']:.3f} ms (+{(r['p50'] - d1['p50']) / 2:.3f}/hop), p99 {r['p99']:.3f} ms"
        for n, r in unloaded.items()))  # fmt: skip
    gen_name = "paced_load.c (compiled)" if generator is not None else "paced_load (Python)"
    print(
        f"\nfixed rate: target {rate:,.0f} req/s (half the trustmesh max), open-loop schedule over "
        f"{RATE_CONNS} connections, {DURATION}s per path, medians of {ROUNDS} interleaved rounds "
        f"(achieved: the lowest); load generator: {gen_name}"
    )
    for mode, rows in fixed.items():
        print(f"\n{FIXED_MODES[mode]}")
        print_fixed(rows, rate)
    print("(targets per hop: p50 ≤ 0.1 ms, p99 ≤ 1 ms)")
    print(f"\nRSS MiB: outbound idle {idle_rss['outbound']:.1f}, inbound idle {idle_rss['inbound']:.1f} (target ≤ 45); "
          f"with 1,000 open client connections: outbound {held[0]:.1f}, inbound {held[1]:.1f}")  # fmt: skip
    print(
        f"\nload average (1 min) before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}; "
        f"CPU pressure (share of the last 60 s some task waited for a CPU) before / after: "
        f"{load_before[1]} / {cpu_pressure()}. Before ≫ 0 means other work shared the 2 cores."
    )
    if codecs:
        line = ", ".join(f"{k} {v:.1f} µs" for k, v in codecs.items())
        print(f"\nHTTP/1 codec, parse request+response and rebuild the head: {line}")
    return 0


def parse_args(argv: list[str]) -> None:
    """``--help`` describes the run; no other arguments (a typo must not start 3.5 minutes
    of load)."""
    argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="environment: BENCH_SECONDS (default 5) seconds per round, "
        "BENCH_ROUNDS (default 3) interleaved rounds",
    ).parse_args(argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--paced"]:  # the load generator's own process (see run_paced)
        port, rate, duration, conns = sys.argv[2:6]
        print(json.dumps(paced_load(int(port), float(rate), float(duration), int(conns))))
        sys.exit(0)
    parse_args(sys.argv[1:])
    # `timeout` and supervisors stop with SIGTERM: exit through the finally blocks, which stop
    # every server started here, instead of leaving them running into the next measurement.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
