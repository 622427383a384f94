"""How steady is this machine's CPU? Fixed user-space work on each CPU, timed in 2 ms windows.

One process per CPU, pinned there, repeats a fixed unit of work (``python``: dict look-ups and
bytes formatting, the interpreter's share of a proxied request; ``openssl``: AES-128-GCM over
300 bytes, the mesh-TLS share) and counts how many units it completes per nanosecond of its
*own* CPU time in each 2 ms window. Time spent preempted, or stolen by the hypervisor (this
kernel subtracts steal from task time), does not count, so a window that runs slower means the
same instructions took longer on that CPU: the work itself was slowed.

An *episode* is a stretch of at least 20 ms whose rate, averaged over 10 ms, falls below 0.75 of
the median (and lasts while it stays below 0.85). On a quiet machine there are none; on the
shared development VM they are what sets the proxies' p99 (see the README's proxy benchmark).

Run: ``.venv/bin/python benchmarks/cpu_steadiness.py [--seconds 60] [--cpus 0,1] [-o json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

WINDOW_NS = 2_000_000
WARM_UP_S = 0.5
WORKLOADS = ("python", "openssl")


@dataclass(frozen=True, slots=True)
class Episode:
    start_s: float  # from the start of the measurement
    ms: int
    mean: float  # the stretch's mean rate, relative to the median


def find_episodes(
    relative: Sequence[float],
    *,
    window_ms: float = WINDOW_NS / 1e6,
    smooth: int = 5,
    enter: float = 0.75,
    leave: float = 0.85,
    min_ms: float = 20,
) -> list[Episode]:
    """Slow stretches in ``relative`` (each window's rate divided by the median): where the
    ``smooth``-window average drops below ``enter``, until it climbs back to ``leave``."""
    if smooth < 1 or not 0 < enter <= leave:
        raise ValueError("need smooth >= 1 and 0 < enter <= leave")
    averaged = [sum(relative[i : i + smooth]) / smooth for i in range(len(relative) - smooth + 1)]
    out: list[Episode] = []
    i = 0
    while i < len(averaged):
        if averaged[i] >= enter:
            i += 1
            continue
        j = i
        while j < len(averaged) and averaged[j] < leave:
            j += 1
        # the averages i..j-1 cover windows i..j+smooth-2; trim the normal ones at either end
        first, last = i, min(j + smooth - 2, len(relative) - 1)
        while first < last and relative[first] >= leave:
            first += 1
        while last > first and relative[last] >= leave:
            last -= 1
        span = relative[first : last + 1]
        if len(span) * window_ms >= min_ms:
            mean = round(sum(span) / len(span), 2)
            out.append(
                Episode(round(first * window_ms / 1000, 3), round(len(span) * window_ms), mean)
            )
        i = j
    return out


def _unit(workload: str) -> Callable[[], object]:
    if workload == "openssl":
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        aead, nonce, payload = AESGCM(AESGCM.generate_key(bit_length=128)), b"\0" * 12, b"x" * 300
        return lambda: aead.encrypt(nonce, payload, None)
    table = {f"k{i}": i for i in range(64)}
    keys = ("k1", "k7", "k33", "k60") * 8

    def python_unit() -> bytes:
        total = 0
        for key in keys:
            total += table[key]
        return b"GET /%d HTTP/1.1\r\n" % total

    return python_unit


def measure(cpu: int, seconds: float, workload: str) -> list[float]:
    """Units per nanosecond of own CPU time, one value per 2 ms window, pinned to ``cpu``."""
    os.sched_setaffinity(0, {cpu})
    unit = _unit(workload)
    batch = 1  # enough units for ~10 µs, so that reading the clocks costs little
    while True:
        t0 = time.perf_counter_ns()
        for _ in range(batch):
            unit()
        if time.perf_counter_ns() - t0 > 10_000:
            break
        batch *= 2
    warm_until = time.monotonic() + WARM_UP_S  # caches and the CPU's clock settle first
    while time.monotonic() < warm_until:
        unit()
    rates: list[float] = []
    deadline = time.monotonic() + seconds
    wall0, own0, count = time.perf_counter_ns(), time.thread_time_ns(), 0
    while time.monotonic() < deadline:
        for _ in range(batch):
            unit()
        count += batch
        wall = time.perf_counter_ns()
        if wall - wall0 >= WINDOW_NS:
            own = time.thread_time_ns()
            if own - own0 > WINDOW_NS // 2:  # mostly ran: a rate worth comparing
                rates.append(count / (own - own0))
            wall0, own0, count = wall, own, 0
    return rates


def summarize(cpu: int, workload: str, rates: Sequence[float]) -> dict[str, object]:
    if not rates:
        raise ValueError(f"CPU {cpu}: no window ran long enough to measure")
    median = statistics.median(rates)
    relative = sorted(r / median for r in rates)
    episodes = find_episodes([r / median for r in rates])
    return {
        "cpu": cpu,
        "workload": workload,
        "windows": len(rates),
        "p1": round(relative[len(relative) // 100], 3),
        "p5": round(relative[len(relative) // 20], 3),
        "below_0_8": round(sum(r < 0.8 for r in relative) / len(relative), 4),
        "episodes": [asdict(e) for e in episodes],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--cpus", default=",".join(str(c) for c in sorted(os.sched_getaffinity(0))))
    parser.add_argument("--workload", choices=WORKLOADS, default=None,
                        help="default: python on even CPUs, openssl on odd ones")  # fmt: skip
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 3600:
        parser.error("--seconds must be in (0, 3600]")
    if args.worker is not None:  # one pinned measurement, reported as JSON on stdout
        workload = args.workload or WORKLOADS[args.worker % 2]
        print(
            json.dumps(
                summarize(args.worker, workload, measure(args.worker, args.seconds, workload))
            )
        )
        return 0
    try:
        cpus = [int(c) for c in args.cpus.split(",") if c]
    except ValueError:
        parser.error(f"--cpus wants a comma-separated list of CPU numbers, got {args.cpus!r}")
    extra = ["--workload", args.workload] if args.workload else []
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--seconds", str(args.seconds), "--worker", str(c), *extra],
            stdout=subprocess.PIPE,
            text=True,
        )
        for c in cpus
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=args.seconds + 60)
        if proc.returncode != 0:
            print(f"a worker failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        results.append(json.loads(out))
    if args.output == "json":
        print(json.dumps({"seconds": args.seconds, "cpus": results}))
        return 0
    print(f"{args.seconds:g} s per CPU, 2 ms windows, rate relative to each CPU's median")
    for r in results:
        eps = r["episodes"]
        print(
            f"CPU {r['cpu']} ({r['workload']}): p1 {r['p1']:.2f}  p5 {r['p5']:.2f}  "
            f"windows below 0.8: {100 * r['below_0_8']:.1f} %  episodes: {len(eps)}"
        )
        for e in eps:
            print(f"    at {e['start_s']:7.2f} s  {e['ms']:4d} ms at {e['mean']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
