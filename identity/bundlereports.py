"""Which trust bundle the mesh's proxies hold, as they report it when they renew.

A TrustMesh proxy sends the SHA-256 digest of its trust bundle with every Certify (field 1000;
Linkerd proxies send nothing). The identity service remembers, per identity, the digest of its
latest *successful* request (only proven identities count) until that certificate expires. The
result answers the anchor-rotation question "does every proxy hold the new bundle yet?" from
the CA, as of each proxy's last renewal: a proxy renews at 70 % of its certificate's life, so
the view lags by up to that much, and a restarted fleet reports at once.

Reports are bounded: at most ``capacity`` identities (least recently renewed dropped first), and
a digest that is not 64 lowercase hex characters is counted as ``invalid`` rather than becoming
a label. Worker processes ship what changed (:meth:`BundleReports.drain`) to the supervisor,
which merges it (:meth:`BundleReports.merge`): for one identity, the report whose certificate
expires last wins.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Mapping

from prometheus_client.core import GaugeMetricFamily

DEFAULT_CAPACITY = 100_000  # identities remembered; ~150 bytes each
UNREPORTED = ""  # label value for callers that sent no digest
INVALID = "invalid"
MAX_DIGEST_LABELS = 16  # distinct digests rendered; the rest are summed under "other"
OTHER = "other"
_HEX = frozenset("0123456789abcdef")


def digest_label(digest: str) -> str:
    """The label a reported digest is counted under."""
    if not digest:
        return UNREPORTED
    if len(digest) == 64 and set(digest) <= _HEX:
        return digest
    return INVALID


class BundleReports:
    """identity → (reported digest, the issued certificate's NotAfter in epoch seconds).

    ``record`` runs on the Certify path, ``counts`` at scrape time and ``merge`` on a worker
    pool's reader threads, so every method takes the lock.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity <= 0:
            raise ValueError(f"bundle report capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._latest: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._changed: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._latest)

    def record(self, identity: str, digest: str, valid_until: float) -> None:
        """``identity`` was issued a certificate valid until ``valid_until`` (epoch seconds)
        and reported holding the bundle ``digest``."""
        entry = (digest_label(digest), valid_until)
        with self._lock:
            self._put(identity, entry)
            self._changed[identity] = entry

    def drain(self) -> dict[str, tuple[str, float]]:
        """What was recorded since the previous drain (a worker ships this)."""
        with self._lock:
            changed, self._changed = self._changed, {}
        return changed

    def merge(self, changes: Mapping[str, tuple[str, float]]) -> None:
        """Apply another process's :meth:`drain`; a later NotAfter wins per identity."""
        with self._lock:
            for identity, (label, valid_until) in changes.items():
                known = self._latest.get(identity)
                if known is None or known[1] <= valid_until:
                    self._put(identity, (digest_label(label), float(valid_until)))

    def _put(self, identity: str, entry: tuple[str, float]) -> None:
        self._latest[identity] = entry
        self._latest.move_to_end(identity)
        while len(self._latest) > self.capacity:
            self._latest.popitem(last=False)

    def counts(self, now: float) -> Counter[str]:
        """Identities per reported digest label, among certificates still valid at ``now``
        (expired reports are forgotten here)."""
        with self._lock:
            expired = [i for i, (_, until) in self._latest.items() if until <= now]
            for identity in expired:
                del self._latest[identity]
            return Counter(label for label, _ in self._latest.values())


def reports_family(counts: Counter[str], current_digest: str | None) -> GaugeMetricFamily:
    """``identity_caller_trust_bundles{digest,current}``: identities by the bundle they reported
    at their latest renewal; ``current="true"`` for the bundle the issuer was validated against."""
    family = GaugeMetricFamily(
        "identity_caller_trust_bundles",
        "Identities with a valid certificate, by the trust bundle digest they reported when "
        "it was issued ('' = not reported, 'invalid' = not a SHA-256 hex digest).",
        labels=["digest", "current"],
    )
    # The current bundle always gets its own series, however few report it.
    ranked = sorted(counts.items(), key=lambda kv: (kv[0] != current_digest, -kv[1], kv[0]))
    shown, rest = ranked[:MAX_DIGEST_LABELS], ranked[MAX_DIGEST_LABELS:]
    for label, count in shown:
        family.add_metric([label, str(label == current_digest).lower()], count)
    if rest:
        family.add_metric([OTHER, "false"], sum(count for _, count in rest))
    return family
