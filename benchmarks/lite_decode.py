"""What the sidecar's protobuf codec costs: protos.lite beside protobuf (upb), in one run.

The sidecar decodes the control plane's messages with ``protos/lite.py`` (plain Python, so that
each proxy does not hold protobuf's runtime: 2.5 MiB resident). This measures, side by side on
the same bytes, per message:

- a destination ``Update`` adding N endpoints (each with identity, protocol hint, opaque port,
  a label and a workload reference), the largest message a proxy receives: decoding alone,
  and decoding plus the client's conversion to model values (``destination.decode``), which
  is what blocks the proxy's event loop;
- an ``InboundPolicy`` with 8 authorizations and 8 routes;
- a ``CertifyResponse`` (a leaf and an intermediate).

upb decodes lazily (fields are read when touched), so "decode" alone flatters it; "+ model"
is the comparison that matters. Best of several rounds, the collector off while timing.

    .venv/bin/python benchmarks/lite_decode.py [--endpoints 1000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from destination.decode import (  # noqa: E402
    INBOUND_POLICY,
    UPDATE,
    inbound_from_proto,
    update_from_proto,
)
from destination.model import Add, Endpoint  # noqa: E402
from destination.policy import (  # noqa: E402
    Authentication,
    AuthKind,
    Authorization,
    HttpMatch,
    InboundPolicy,
    InboundRoute,
    Network,
    PathMatch,
    Protocol,
    Ref,
)
from destination.wire import inbound_to_proto, update_to_proto  # noqa: E402
from protos import destination_pb2, identity_pb2, lite, policy_pb2  # noqa: E402


def best_ms(fn: Callable[[], object], rounds: int, per_round: int) -> float:
    """Milliseconds per call, best round. The collector is off while timing, as timeit has
    it (the proxy runs with raised thresholds, see proxy.listener.tune_gc)."""
    times = []
    for _ in range(rounds):
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            for _ in range(per_round):
                fn()
            times.append((time.perf_counter() - start) / per_round * 1000)
        finally:
            gc.enable()
    return min(times)


def update_bytes(n: int) -> bytes:
    identity = "web.default.serviceaccount.identity.trustmesh.cluster.local"
    endpoints = tuple(
        Endpoint(
            f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}",
            8080,
            identity=identity,
            protocol_hint="h2",
            opaque_inbound_port=4143,
            metric_labels=(("pod", f"web-{i}"),),
            workload=f"default/web-{i}",
        )
        for i in range(n)
    )
    return bytes(update_to_proto(Add(endpoints)).SerializeToString())


def policy_bytes() -> bytes:
    mesh = Authentication(AuthKind.IDENTITIES, ("*.default.serviceaccount.identity.*",))
    authz = tuple(
        Authorization(
            Ref("AuthorizationPolicy", f"a{i}", "default"), (Network.parse("10.0.0.0/8"),), mesh
        )
        for i in range(8)
    )
    routes = tuple(
        InboundRoute(
            Ref("HTTPRoute", f"r{i}", "default"),
            (HttpMatch(PathMatch("PathPrefix", f"/api/v{i}"), (), "GET", ()),),
            authz[:2],
        )
        for i in range(8)
    )
    policy = InboundPolicy(
        "default", "web-0", 8080, Ref("Server", "web-http", "default"), Protocol.HTTP1, authz,
        routes, timedelta(seconds=10), False,
    )  # fmt: skip
    return bytes(inbound_to_proto(policy).SerializeToString())


def certify_bytes() -> bytes:
    answer = identity_pb2.CertifyResponse(
        leaf_certificate=b"\x30" * 700, intermediate_certificates=[b"\x30" * 600]
    )
    answer.valid_until.FromSeconds(1_800_000_000)
    return bytes(answer.SerializeToString())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoints", type=int, default=1000, help="endpoints in the Update")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the best is reported")
    args = parser.parse_args()
    if args.endpoints < 1 or args.rounds < 1:
        parser.error("--endpoints and --rounds must be at least 1")
    update, policy, certify = update_bytes(args.endpoints), policy_bytes(), certify_bytes()
    response = "io.linkerd.proxy.identity.CertifyResponse"
    cases: list[tuple[str, int, Callable[[], object], Callable[[], object]]] = [
        (
            f"Update, {args.endpoints} endpoints ({len(update):,} bytes): decode",
            5,
            lambda: lite.decode(UPDATE, update),
            lambda: destination_pb2.Update.FromString(update),
        ),
        (
            f"Update, {args.endpoints} endpoints: decode + model",
            5,
            lambda: update_from_proto(lite.decode(UPDATE, update)),
            lambda: update_from_proto(destination_pb2.Update.FromString(update)),
        ),
        (
            f"InboundPolicy ({len(policy):,} bytes): decode + model",
            200,
            lambda: inbound_from_proto(lite.decode(INBOUND_POLICY, policy)),
            lambda: inbound_from_proto(policy_pb2.InboundPolicy.FromString(policy)),
        ),
        (
            f"CertifyResponse ({len(certify):,} bytes): decode + read",
            2000,
            lambda: lite.decode(response, certify).valid_until.ToDatetime(),
            lambda: identity_pb2.CertifyResponse.FromString(certify).valid_until.ToDatetime(),
        ),
    ]
    print(f"{'message':<58} {'protos.lite':>12} {'protobuf':>12} {'ratio':>7}")
    for label, per_round, mine, theirs in cases:
        a = best_ms(mine, args.rounds, per_round)
        b = best_ms(theirs, args.rounds, per_round)
        print(f"{label:<58} {a:9.3f} ms {b:9.3f} ms {a / b:6.1f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
