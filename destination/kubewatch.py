"""List-then-watch of one Kubernetes resource, kept as a local copy that never goes stale quietly.

A :class:`Reflector` runs in a thread of its own (the official client is synchronous): it lists
the resource, then watches it; the watch's read timeout doubles as the resync period (no event
for ``resync`` seconds means re-list). Every way a watch can end re-lists, so the loop only stops
when told to:

- the read timeout (no event for ``resync``): re-list at once;
- a clean end of the stream (an API server that closed it): re-list after a short backoff;
- an ``ERROR`` event (410 Gone: the resourceVersion expired): re-list at once;
- an exception (connection refused or reset while the API server restarts, bad JSON, 5xx):
  re-list after a jittered exponential backoff capped at ``max_backoff``;
- 404 (a CRD that is not installed): the resource counts as listed and empty, and is looked
  for again after the backoff, so installing the CRD later needs no restart.

Each restart is counted in ``trustmesh_destination_kubernetes_watch_restarts_total{resource,
reason}``. :func:`run_reflectors` drives a set of reflectors from asyncio and calls ``apply``
(debounced) on the event loop after changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from destination.metrics import ServiceMetrics

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)
Object = dict[str, Any]


def object_key(obj: Object) -> Key:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name")))


class Reflector:
    """The objects of one list call, kept current by a list/watch loop (:meth:`run`)."""

    def __init__(
        self,
        resource: str,
        list_fn: Callable[..., Any],
        kwargs: dict[str, Any],
        metrics: ServiceMetrics,
        *,
        transform: Callable[[Object], Object] = lambda o: o,
        resync: float = 300.0,
        max_backoff: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        if resync <= 0 or max_backoff <= 0:
            raise ValueError("resync and max_backoff must be positive")
        self.resource = resource
        self._list_fn = list_fn
        self._kwargs = kwargs
        self._metrics = metrics
        self._transform = transform
        self._resync = resync
        self._max_backoff = max_backoff
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._objects: dict[Key, Object] = {}
        self.synced = False
        self.halt = threading.Event()
        self.notify: Callable[[], None] = lambda: None  # set by run_reflectors

    def objects(self) -> dict[Key, Object]:
        with self._lock:
            return dict(self._objects)

    def _replace(self, fresh: dict[Key, Object]) -> None:
        with self._lock:
            self._objects = fresh
            self.synced = True
        self.notify()

    def _restart(self, reason: str) -> None:
        self._metrics.watch_restarts.labels(self.resource, reason).inc()

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before re-listing after ``attempt`` consecutive failures."""
        if attempt <= 0:
            return 0.0
        delay = min(self._max_backoff, 0.2 * 2 ** min(attempt, 10))
        return delay * (0.5 + self._rng.random() / 2)

    def run(self) -> None:
        """Thread body: list and watch until :attr:`halt` is set."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        attempt = 0
        while not self.halt.is_set():
            try:
                resp = self._list_fn(
                    **self._kwargs, _preload_content=False, _request_timeout=(5, 30)
                )
                items = json.loads(resp.data).get("items") or []
                self._replace(
                    {
                        object_key(t): t
                        for t in (self._transform(o) for o in items if isinstance(o, dict))
                    }
                )
                attempt = 0
                reason = self._watch(watch.Watch())
                self._restart(reason)
                if reason == "closed":
                    attempt += 1  # a server that keeps closing watches must not spin the loop
            except ApiException as e:
                if e.status == 404:
                    self._replace({})  # CRD not installed: empty, looked for again later
                    self._restart("missing")
                else:
                    log.warning(
                        "kubernetes %s: %s %s; re-listing", self.resource, e.status, e.reason
                    )
                    self._restart("error")
                attempt += 1
            except Exception as e:  # refused, reset, read timeout, bad JSON: re-list
                if _is_read_timeout(e):
                    self._restart("resync")  # a quiet watch reached the resync period
                else:
                    log.info("kubernetes %s watch failed (%s); re-listing", self.resource, e)
                    self._restart("error")
                    attempt += 1
            if attempt:
                self.halt.wait(self.backoff(attempt))

    def _watch(self, w: Any) -> str:
        """Apply watch events until the stream ends; returns why it ended."""
        stream = w.stream(self._list_fn, **self._kwargs, _request_timeout=(5, self._resync))
        for event in stream:
            if self.halt.is_set():
                w.stop()
                return "stopped"
            obj = event.get("raw_object")
            if event.get("type") == "ERROR" or not isinstance(obj, dict):
                w.stop()
                return "expired"  # 410 Gone and the like: only a fresh list is trustworthy
            key = object_key(obj)
            with self._lock:
                if event["type"] == "DELETED":
                    self._objects.pop(key, None)
                else:
                    self._objects[key] = self._transform(obj)
            self.notify()
        return "closed"


def _is_read_timeout(e: Exception) -> bool:
    return "read timed out" in str(e).lower() or type(e).__name__ == "ReadTimeoutError"


async def run_reflectors(
    reflectors: list[Reflector],
    apply: Callable[[], object],
    stop: asyncio.Event,
    *,
    debounce: float = 0.02,
) -> None:
    """Run each reflector in a thread; call ``apply()`` on this loop after changes (bursts
    coalesced over ``debounce`` seconds) until ``stop`` is set, then stop the threads."""
    loop = asyncio.get_running_loop()
    dirty = asyncio.Event()

    def mark() -> None:
        loop.call_soon_threadsafe(dirty.set)

    for r in reflectors:
        r.notify = mark
    threads = [
        threading.Thread(target=r.run, name=f"k8s-{r.resource}", daemon=True) for r in reflectors
    ]
    for t in threads:
        t.start()
    stopper = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            waiter = asyncio.ensure_future(dirty.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if stop.is_set():
                break
            await asyncio.sleep(debounce)
            dirty.clear()
            apply()
    finally:
        stopper.cancel()
        for r in reflectors:
            r.halt.set()
            r.notify = lambda: None
        await asyncio.to_thread(_join_all, threads, 2.0)


def _join_all(threads: list[threading.Thread], timeout: float) -> None:
    # One deadline for all: a thread blocked in a quiet watch read only notices ``halt`` at the
    # next event or read timeout, and shutdown must not wait that out once per resource. The
    # threads are daemons, so one still reading when the deadline passes does not hold the exit.
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
