"""Leaf issuance rate in one process: DER CSR parse + validation (incl. its signature check),
certificate build, sign, DER out; for an ECDSA P-256 and an ML-DSA-65 issuer, beside the raw
ECDSA P-256 sign rate measured in the same run.

The cases run in interleaved rounds (so that a noisy neighbour hits all of them alike) on one
pinned core, and each reports the median over rounds. Target: >= 4,000 ECDSA leaves/s.

    .venv/bin/python benchmarks/pki_issue.py [--rounds 7] [--seconds 0.5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pki.certs import Credential, create_anchor, create_issuer, issue_leaf
from pki.csr import create_csr, validate_csr
from pki.keys import KeyAlgorithm, PrivateKey
from pki.names import Identity

NOW = datetime(2030, 1, 1, tzinfo=UTC)
TARGET_ECDSA_LEAVES = 4000
POOL = 64  # distinct CSRs per case, cycled, so no result can be cached


@dataclass(frozen=True)
class Case:
    name: str
    op: Callable[[int], object]


def _issuer(algorithm: KeyAlgorithm) -> Credential:
    anchor_key = PrivateKey.generate(algorithm)
    anchor = Credential(
        create_anchor(anchor_key, now=NOW, lifetime=timedelta(days=365)), anchor_key
    )
    return create_issuer(
        PrivateKey.generate(algorithm), anchor, now=NOW, lifetime=timedelta(days=2)
    )


def _leaf_case(name: str, issuer_alg: KeyAlgorithm, csr_alg: KeyAlgorithm) -> Case:
    issuer = _issuer(issuer_alg)
    idents = [Identity(f"sa-{i}", "bench").dns_name for i in range(POOL)]
    csrs = [create_csr(n, PrivateKey.generate(csr_alg)) for n in idents]
    allowed = (KeyAlgorithm.ECDSA_P256, KeyAlgorithm.ML_DSA_65)

    def op(i: int) -> bytes:
        k = i % POOL
        v = validate_csr(csrs[k], expected_name=idents[k], allowed_algorithms=allowed)
        return issue_leaf(v.public_key, v.dns_name, issuer, now=NOW).der

    op(0)  # warm caches shared by every later call (issuer template)
    return Case(name, op)


def _raw_sign_case() -> Case:
    key = PrivateKey.generate(KeyAlgorithm.ECDSA_P256)
    # about the size of a leaf's to-be-signed part
    messages = [os.urandom(420) for _ in range(POOL)]

    def op(i: int) -> bytes:
        return key.sign(messages[i % POOL])

    return Case("raw ECDSA P-256 sign", op)


def _rate(case: Case, seconds: float) -> float:
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(32):
            case.op(n)
            n += 1
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.5, help="per case per round")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.rounds <= 50 or not 0.05 <= args.seconds <= 10:
        parser.error("--rounds must be in 1..50 and --seconds in 0.05..10")

    cpu = None
    if hasattr(os, "sched_setaffinity"):
        cpu = max(os.sched_getaffinity(0))  # CPU 0 tends to take more interrupts
        os.sched_setaffinity(0, {cpu})

    cases = [
        _leaf_case(
            "leaves: ECDSA P-256 issuer, P-256 CSRs",
            KeyAlgorithm.ECDSA_P256,
            KeyAlgorithm.ECDSA_P256,
        ),
        _leaf_case(
            "leaves: ML-DSA-65 issuer, ML-DSA-65 CSRs",
            KeyAlgorithm.ML_DSA_65,
            KeyAlgorithm.ML_DSA_65,
        ),
        _leaf_case(
            "leaves: ML-DSA-65 issuer, P-256 CSRs", KeyAlgorithm.ML_DSA_65, KeyAlgorithm.ECDSA_P256
        ),
        _raw_sign_case(),
    ]
    rates: dict[str, list[float]] = {c.name: [] for c in cases}
    for _ in range(args.rounds):
        for case in cases:  # interleaved: every round measures every case
            rates[case.name].append(_rate(case, args.seconds))

    medians = {name: statistics.median(r) for name, r in rates.items()}
    raw = medians["raw ECDSA P-256 sign"]
    ecdsa = medians[cases[0].name]
    rows = [
        {
            "case": name,
            "per_second": round(m),
            "min": round(min(rates[name])),
            "max": round(max(rates[name])),
            "ratio_to_raw_sign": round(m / raw, 3),
        }
        for name, m in medians.items()
    ]
    result = {
        "cpu": cpu,
        "rounds": args.rounds,
        "seconds_per_round": args.seconds,
        "rows": rows,
        "target_ecdsa_leaves_per_second": TARGET_ECDSA_LEAVES,
        "target_met": ecdsa >= TARGET_ECDSA_LEAVES,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"pki leaf issuance, one process pinned to CPU {cpu}, median of {args.rounds} interleaved rounds"
        )
        print(f"{'case':44} {'per s':>9} {'min':>9} {'max':>9} {'vs raw sign':>12}")
        for row in rows:
            print(
                f"{row['case']:44} {row['per_second']:>9,} {row['min']:>9,} {row['max']:>9,}"
                f" {row['ratio_to_raw_sign']:>11.3f}x"
            )
        verdict = "met" if result["target_met"] else "NOT met"
        print(f"target >= {TARGET_ECDSA_LEAVES:,} ECDSA leaves/s: {verdict} ({ecdsa:,.0f}/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
