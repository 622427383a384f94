"""Destination fan-out: time from a mesh-file change to the update at every one of N subscribers.

Starts ``trustmesh destination serve --mesh-file`` as a real subprocess, opens N concurrent
``Destination/Get`` streams for one service (spread over several client processes and channels,
so the client side is not the bottleneck being measured), then rewrites the mesh file R times
(atomic ``os.replace``, adding one workload each time). Each subscriber stamps the arrival of
the ``add`` carrying the new endpoint with CLOCK_MONOTONIC (shared by all processes on the host);
latency = arrival - the instant just before the rename. Also reports the server's RSS growth per
subscriber (psutil). Bounded: every wait has a deadline.

    .venv/bin/python benchmarks/destination_fanout.py [--subscribers 1000] [--rounds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

AUTHORITY = "web.default.svc.cluster.local:8080"
TARGET_P99_MS = 100.0


def mesh_yaml(workloads: int) -> str:
    docs = [
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n"
        "spec: {selector: {app: web}, ports: [{port: 8080, targetPort: 18080}]}\n"
    ]
    for i in range(workloads):
        a, b = divmod(i + 1, 250)
        docs.append(
            "apiVersion: trustmesh.io/v1alpha1\nkind: Workload\n"
            f"metadata: {{name: web-{i}, namespace: default, labels: {{app: web}}}}\n"
            f"spec: {{serviceAccount: web, address: 10.1.{a}.{b}, inboundProxyPort: 4143}}\n"
        )
    return "---\n".join(docs)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client_proc(port: int, count: int, rounds: int, start_workloads: int, conn: object) -> None:
    """One client process: ``count`` streams; sends back per-round arrival stamps."""
    import grpc

    from protos import destination_pb2 as d
    from protos import destination_pb2_grpc as dg

    async def main() -> None:
        channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(max(1, count // 100))
        ]
        arrivals: list[list[float]] = [[] for _ in range(rounds)]
        ready = 0
        ready_event = asyncio.Event()

        async def subscriber(i: int) -> None:
            nonlocal ready
            stub = dg.DestinationStub(channels[i % len(channels)])
            call = stub.Get(d.GetDestination(path=AUTHORITY, context_token='{"ns":"default"}'))
            known = 0
            async for update in call:
                if update.WhichOneof("update") != "add":
                    continue
                now = time.monotonic()
                before = known
                known += len(update.add.addrs)
                if before == 0:
                    ready += 1
                    if ready == count:
                        ready_event.set()
                    continue
                arrivals[known - start_workloads - 1].append(now)
                if known - start_workloads >= rounds:
                    call.cancel()
                    return

        tasks = []
        for batch in range(0, count, 100):  # batches: a burst of 1000 opens gets CANCELLED
            tasks += [
                asyncio.ensure_future(subscriber(i)) for i in range(batch, min(count, batch + 100))
            ]
            await asyncio.sleep(0.05)
        await asyncio.wait_for(ready_event.wait(), 60)
        conn.send(("ready", None))  # type: ignore[attr-defined]
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30 + rounds * 5)
        conn.send(("arrivals", arrivals))  # type: ignore[attr-defined]
        for ch in channels:
            await ch.close()

    asyncio.run(main())


def wait_ready(admin: int, deadline: float) -> None:
    import urllib.request

    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("destination service did not become ready")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--workloads", type=int, default=10)
    args = ap.parse_args()
    import psutil

    with tempfile.TemporaryDirectory() as tmp:
        mesh = Path(tmp) / "mesh.yaml"
        write_atomic(mesh, mesh_yaml(args.workloads))
        port, admin = free_port(), free_port()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trustmesh",
                "destination",
                "serve",
                "--mesh-file",
                str(mesh),
                "--listen",
                f"127.0.0.1:{port}",
                "--admin-listen",
                f"127.0.0.1:{admin}",
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
        )
        try:
            wait_ready(admin, time.monotonic() + 20)
            proc = psutil.Process(server.pid)
            rss_idle = proc.memory_info().rss
            per = [args.subscribers // args.processes] * args.processes
            per[0] += args.subscribers - sum(per)
            ctx = mp.get_context("spawn")
            pipes, procs = [], []
            for n in per:
                parent, child = ctx.Pipe()
                p = ctx.Process(
                    target=client_proc, args=(port, n, args.rounds, args.workloads, child)
                )
                p.start()
                pipes.append(parent)
                procs.append(p)
            for parent in pipes:
                if not parent.poll(90):
                    raise SystemExit("subscribers did not all receive their initial state")
                parent.recv()
            rss_loaded = proc.memory_info().rss
            changes: list[float] = []
            for r in range(args.rounds):
                time.sleep(0.25)  # let the previous round drain completely
                text = mesh_yaml(args.workloads + r + 1)
                changes.append(time.monotonic())
                write_atomic(mesh, text)
            arrivals: list[list[float]] = [[] for _ in range(args.rounds)]
            for parent in pipes:
                if not parent.poll(60 + args.rounds * 5):
                    raise SystemExit("a client process did not report its arrivals")
                _, got = parent.recv()
                for r in range(args.rounds):
                    arrivals[r] += got[r]
            for p in procs:
                p.join(10)
        finally:
            server.terminate()
            server.wait(10)
    latencies = sorted((a - changes[r]) * 1000 for r in range(args.rounds) for a in arrivals[r])
    expected = args.subscribers * args.rounds
    per_round_max = [
        max((a - changes[r]) * 1000 for a in arrivals[r]) for r in range(args.rounds) if arrivals[r]
    ]
    p = statistics.quantiles(latencies, n=100)
    rows = [
        ("subscribers", f"{args.subscribers}"),
        ("changes", f"{args.rounds}"),
        ("updates received", f"{len(latencies)} / {expected}"),
        ("p50 change -> subscriber", f"{p[49]:.1f} ms"),
        ("p99 change -> subscriber", f"{p[98]:.1f} ms   (target <= {TARGET_P99_MS:.0f} ms)"),
        ("max change -> subscriber", f"{latencies[-1]:.1f} ms"),
        ("median of per-change max (all reached)", f"{statistics.median(per_round_max):.1f} ms"),
        ("server RSS idle", f"{rss_idle / 2**20:.1f} MiB"),
        ("server RSS with subscribers", f"{rss_loaded / 2**20:.1f} MiB"),
        (
            "server memory per subscriber",
            f"{(rss_loaded - rss_idle) / args.subscribers / 1024:.1f} KiB",
        ),
    ]
    if os.environ.get("FANOUT_DEBUG"):
        print("per-change max ms:", " ".join(f"{m:.0f}" for m in per_round_max))
    width = max(len(k) for k, _ in rows)
    print(f"{'metric':<{width}}  value")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    ok = len(latencies) == expected and p[98] <= TARGET_P99_MS
    print("RESULT:", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    # `timeout` and supervisors stop with SIGTERM: exit through the finally blocks, which stop
    # every server started here, instead of leaving them running into the next measurement.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
