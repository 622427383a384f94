"""Issuer hot reload: poll a source, validate the candidate, swap it in or refuse it.

A refused issuer leaves the old one in use and is reported three ways: a warning log line, the
``identity_issuer_reloads_total{result="refused"}`` counter, and (on Kubernetes) a Warning Event
``IssuerUpdateSkipped``; a successful swap is a Normal Event ``IssuerUpdated``. The loop catches
everything a reload can raise, so it only stops when told to. A refused or unreadable revision is
tried again every ``retry_after`` even if the source does not change: an issuer that was not yet
valid (the writer's clock ahead of ours) or a file that was briefly unreadable is picked up then,
instead of waiting for the next rotation.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Protocol

from identity.errors import IdentityError, IssuerRejected
from identity.issuer import Issuer, check_issuer
from identity.metrics import ReloadStats
from identity.sources import IssuerSource

log = logging.getLogger(__name__)

EVENT_UPDATED = "IssuerUpdated"
EVENT_SKIPPED = "IssuerUpdateSkipped"
DEFAULT_RETRY_AFTER = timedelta(seconds=30)


class EventRecorder(Protocol):
    def record(self, reason: str, message: str, *, warning: bool) -> None: ...


class NoEvents:
    """Outside Kubernetes there is nowhere to post events; logs and metrics remain."""

    def record(self, reason: str, message: str, *, warning: bool) -> None:
        return None


class KubernetesEvents:
    """core/v1 Events attached to the identity Deployment, as Linkerd's controller does."""

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        *,
        clock: Callable[[], datetime],
        deployment: str = "trustmesh-identity",
    ) -> None:
        from kubernetes import client as k8s

        self._k8s = k8s
        self._core = k8s.CoreV1Api(api_client)
        self._namespace = namespace
        self._deployment = deployment
        self._clock = clock

    def record(self, reason: str, message: str, *, warning: bool) -> None:
        k8s = self._k8s
        now = self._clock()
        event = k8s.CoreV1Event(
            metadata=k8s.V1ObjectMeta(
                name=f"{self._deployment}.{uuid.uuid4().hex[:16]}", namespace=self._namespace
            ),
            involved_object=k8s.V1ObjectReference(
                api_version="apps/v1",
                kind="Deployment",
                name=self._deployment,
                namespace=self._namespace,
            ),
            reason=reason,
            message=message,
            type="Warning" if warning else "Normal",
            source=k8s.V1EventSource(component=self._deployment),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        try:
            self._core.create_namespaced_event(self._namespace, event)
        except Exception as e:  # an event is best effort: never let it break a reload
            log.warning("could not record event %s: %s", reason, getattr(e, "reason", e))


class IssuerWatcher:
    """Polls ``source`` and installs validated issuers through ``install``."""

    def __init__(
        self,
        source: IssuerSource,
        install: Callable[[Issuer], None],
        current: Callable[[], Issuer | None],
        *,
        clock: Callable[[], datetime],
        reloads: ReloadStats,
        events: EventRecorder | None = None,
        interval: float = 1.0,
        retry_after: timedelta = DEFAULT_RETRY_AFTER,
    ) -> None:
        if interval <= 0:
            raise ValueError("the poll interval must be positive")
        if retry_after <= timedelta(0):
            raise ValueError("the retry interval must be positive")
        self.source = source
        self._install = install
        self._current = current
        self._clock = clock
        self._reloads = reloads
        self._events = events or NoEvents()
        self._interval = interval
        self._retry_after = retry_after
        self._seen: object = object()  # never equal to a real revision
        self._retry_at: datetime | None = None  # set while the seen revision was not installed

    def reload(self) -> str:
        """Check the source once; return the reload result (or ``"same"`` when untouched)."""
        revision = self.source.revision()
        now = self._clock()
        if revision == self._seen and (self._retry_at is None or now < self._retry_at):
            return "same"
        self._seen = revision
        self._retry_at = now + self._retry_after  # cleared below once the revision is in use
        try:
            credential, bundle = self.source.load()
            issuer = check_issuer(credential, bundle, source=self.source.description, at=now)
        except IssuerRejected as e:
            return self._skip("refused", str(e))
        except IdentityError as e:
            return self._skip("error", str(e))
        except Exception as e:  # anything else (I/O, a bug): report it, keep watching
            log.exception("issuer reload from %s failed", self.source.description)
            return self._skip("error", f"{type(e).__name__}: {e}")
        self._retry_at = None
        if issuer.same_as(self._current()):
            self._reloads.count("unchanged")
            return "unchanged"
        first = self._current() is None
        self._install(issuer)
        self._reloads.count("updated")
        cert = issuer.credential.certificate
        message = (
            f"{'Loaded' if first else 'Updated'} identity issuer {cert.subject} "
            f"({issuer.fingerprint[:16]}, NotAfter {issuer.not_after.isoformat()})"
        )
        log.info("%s from %s", message, self.source.description)
        self._events.record(EVENT_UPDATED, message, warning=False)
        return "updated"

    def _skip(self, result: str, reason: str) -> str:
        self._reloads.count(result)
        kept = self._current()
        what = f"keeping {kept.fingerprint[:16]}" if kept else "no issuer loaded"
        message = f"Skipping issuer update ({what}): {reason}"
        log.warning("%s", message)
        self._events.record(EVENT_SKIPPED, message, warning=True)
        return result

    async def run(self) -> None:
        """Poll forever (until cancelled)."""
        while True:
            try:
                await asyncio.to_thread(self.reload)
            except Exception:  # reload() handles its own errors; this is the last line
                log.exception("issuer watcher iteration failed")
            await asyncio.sleep(self._interval)
