"""Memory of the proxy as the mesh runs it, beside the data-plane process alone, in one run.

`proxy_http1.py` measures `python -m proxy` with a static configuration: the data plane without
the control-plane clients. In the mesh each workload's proxy is `trustmesh proxy run`, which also
holds an identity client and a destination client (on the proxy's own gRPC channel,
`proxy/rpc.py`), their metrics and the CLI. This benchmark starts both side by side on this host:

- `trustmesh up` on the demo mesh, in a fresh home: six sidecars (`trustmesh proxy run`), the
  control plane and the demo apps;
- one `python -m proxy` with a static configuration, as `proxy_http1.py` runs it.

For each proxy process it reads /proc/PID/smaps_rollup: RSS, PSS (shared pages divided among the
processes that map them), private memory (what the process alone holds) and shared clean pages
(mostly libraries), and its thread count; idle (after a settling pause) and, for the sidecars,
again after HTTP traffic through the demo chain (wrk). It also names the libraries that take the
most RSS in one sidecar. Every process started here is stopped at the end (SIGTERM included).

Run: .venv/bin/python benchmarks/proxy_memory.py [--seconds 20] [--settle 10]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy_http1 import PROCS, ROOT, free_port, make_pki, start, stop_all

SIDECAR_MODULE = "trustmesh.up.sidecar_process"
FIELDS = ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Shared_Clean", "Shared_Dirty")


def smaps(pid: int) -> dict[str, float]:
    """MiB per field of /proc/PID/smaps_rollup, plus 'private' and the thread count."""
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    kib = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+):\s+(\d+) kB", text, re.M)}
    out = {f: kib.get(f, 0) / 1024 for f in FIELDS}
    out["private"] = out["Private_Clean"] + out["Private_Dirty"]
    out["threads"] = psutil.Process(pid).num_threads()
    return out


def libraries(pid: int, top: int = 5) -> list[tuple[str, float]]:
    """The file-backed mappings with the most RSS (MiB), summed per file."""
    per: dict[str, int] = {}
    path = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head[0]):
            path = head[5] if len(head) > 5 and head[5].startswith("/") else ""
        elif head and head[0] == "Rss:" and path:
            per[path] = per.get(path, 0) + int(head[1])
    ranked = sorted(per.items(), key=lambda kv: -kv[1])[:top]
    return [(Path(p).name, kib / 1024) for p, kib in ranked]


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(timeout=0.5):
            return proc.stdout.readline()
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}: {err[-2000:]}")
    raise RuntimeError(f"{proc.args[:4]} printed nothing within {timeout}s")


def sidecar_pids(up_pid: int) -> dict[str, int]:
    """workload -> pid of its sidecar: `trustmesh proxy run`, which replaces itself with
    `python -m trustmesh.up.sidecar_process NAMESPACE/WORKLOAD` once its flags are checked."""
    found = {}
    for child in psutil.Process(up_pid).children(recursive=True):
        argv = child.cmdline()
        if SIDECAR_MODULE in argv and argv.index(SIDECAR_MODULE) + 1 < len(argv):
            found[argv[argv.index(SIDECAR_MODULE) + 1].rpartition("/")[2]] = child.pid
    return found


def summary(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def line(name: str, m: dict[str, float]) -> str:
    return (
        f"{name:<34} RSS {m['Rss']:6.1f}  PSS {m['Pss']:6.1f}  private {m['private']:6.1f}  "
        f"shared clean {m['Shared_Clean']:6.1f} MiB  threads {m['threads']:.0f}"
    )


def main(seconds: int, settle: float) -> int:
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian package wrk); cannot drive traffic")
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="tm-bench-"))
    try:
        env = {**os.environ, "TRUSTMESH_HOME": str(tmp / "home")}
        up = start([sys.executable, "-m", "trustmesh", "up", "-o", "json"], cwd=ROOT, env=env)
        info = json.loads(read_line(up, 120))
        sidecars = sidecar_pids(up.pid)
        upstreams = {w["workload"]: w["upstreams"] for w in info["workloads"]}
        web = upstreams["demo/traffic-0"]["web.demo.svc.cluster.local:8080"]

        ids = make_pki(tmp)
        zero = {"host": "127.0.0.1", "port": 0}
        cfg = {"identity": ids["api"], "credentials": {"chain": "api.crt", "key": "api.key", "bundle": "bundle.pem"},
               "outbound": zero, "admin": zero, "inbound": {**zero, "ports": [free_port()]}}  # fmt: skip
        (tmp / "static.json").write_text(json.dumps(cfg))
        static = start(
            [sys.executable, "-m", "proxy", "--config", str(tmp / "static.json")], cwd=ROOT
        )
        read_line(static, 60)

        time.sleep(settle)
        idle = {name: smaps(pid) for name, pid in sidecars.items()}
        static_idle = smaps(static.pid)
        libs = libraries(next(iter(sidecars.values())))

        wrk = subprocess.run(
            ["wrk", "-t1", "-c16", f"-d{seconds}s", f"http://{web}/"],
            capture_output=True, text=True, timeout=seconds + 60,
        )  # fmt: skip
        rate = re.search(r"Requests/sec:\s+([\d.]+)", wrk.stdout)
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", wrk.stdout)
        time.sleep(3)
        loaded = {name: smaps(pid) for name, pid in sidecars.items()}

        print(f"TrustMesh proxy memory, one run; {len(sidecars)} sidecars of `trustmesh up`")
        print(line("python -m proxy (static), idle", static_idle))
        print(line("trustmesh proxy run, idle (median)", summary(list(idle.values()))))
        for name in sorted(idle):
            print(line(f"  {name}", idle[name]))
        print(
            f"\nafter wrk -c16 for {seconds}s through web -> api -> quote: "
            f"{rate.group(1) if rate else '?'} req/s, non-2xx {bad.group(1) if bad else 0}"
        )
        print(line("trustmesh proxy run (median)", summary(list(loaded.values()))))
        for name in sorted(loaded):
            print(line(f"  {name}", loaded[name]))
        print("\nlargest file-backed RSS in one sidecar (MiB): "
              + ", ".join(f"{n} {mib:.1f}" for n, mib in libs))  # fmt: skip
        return 0
    finally:
        stop_all()
        PROCS.clear()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=20, help="traffic duration (default 20)")
    parser.add_argument("--settle", type=float, default=10.0, help="idle pause (default 10 s)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main(args.seconds, args.settle))
