"""Fan-out of answers to subscribers: one topic per distinct question, shared by all who ask.

A :class:`Topic` holds the current answer to one question (the endpoints of one authority, the
policy of one port, the trust bundle) and a version number. When a new cluster state arrives the
:class:`Hub` recomputes each live topic once; only topics whose answer changed bump their
version and wake their subscribers. Subscribers never queue messages: each remembers the version
it last sent and catches up to the newest answer, so a slow stream costs no memory and sees
coalesced changes. Encoded messages are cached per (from-version, to-version), so 1,000
subscribers of one service cost one diff and one encoding per change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from destination.errors import DestinationError, Unavailable
from destination.resources import ClusterState

log = logging.getLogger(__name__)

V = TypeVar("V")

Resolver = Callable[[ClusterState], Any]


class Topic(Generic[V]):
    """The current answer (a value or a :class:`DestinationError`) to one question."""

    def __init__(self, kind: str, key: Hashable) -> None:
        self.kind = kind
        self.key = key
        self.value: V | DestinationError | None = None  # None: nothing known yet
        self.version = 0
        self.subscribers = 0
        self._changed = asyncio.Event()
        self._cache: dict[Hashable, Any] = {}

    def publish(self, value: V | DestinationError) -> bool:
        """Set a new answer; wake subscribers only when it differs from the current one."""
        if self.version and _same(self.value, value):
            return False
        self.value = value
        self.version += 1
        self._cache = {}
        event, self._changed = self._changed, asyncio.Event()
        event.set()
        return True

    async def wait_newer(self, version: int) -> None:
        """Return once the topic's version differs from ``version``."""
        while self.version == version:
            await self._changed.wait()

    def cached(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()`` once per key for the current version (e.g. encoded updates)."""
        try:
            return self._cache[key]
        except KeyError:
            value = self._cache[key] = build()
            return value


def _same(old: Any, new: Any) -> bool:
    if isinstance(old, DestinationError) or isinstance(new, DestinationError):
        return type(old) is type(new) and str(old) == str(new)
    return bool(old == new)


class Hub:
    """Live topics, recomputed on every new cluster state (or trust bundle)."""

    def __init__(self) -> None:
        self.state: ClusterState | None = None
        self.generation = 0
        self._topics: dict[tuple[str, Hashable], tuple[Topic[Any], Resolver]] = {}
        self._bundle: Topic[Any] = Topic("bundle", None)
        self._bundle.publish(
            Unavailable("no trust bundle is configured on this destination service")
        )

    def topic_count(self) -> int:
        return len(self._topics)

    def set_state(self, state: ClusterState) -> int:
        """Install a new state; returns how many topics changed."""
        self.state = state
        self.generation += 1
        changed = 0
        for topic, resolve in list(self._topics.values()):
            changed += topic.publish(_resolve(resolve, state))
        return changed

    def subscribe(self, kind: str, key: Hashable, resolve: Resolver) -> Topic[Any]:
        """The topic for ``(kind, key)``, created (and resolved) on first use."""
        entry = self._topics.get((kind, key))
        if entry is None:
            topic: Topic[Any] = Topic(kind, key)
            if self.state is not None:
                topic.publish(_resolve(resolve, self.state))
            self._topics[(kind, key)] = (topic, resolve)
        else:
            topic = entry[0]
        topic.subscribers += 1
        return topic

    def release(self, topic: Topic[Any]) -> None:
        topic.subscribers -= 1
        if topic.subscribers <= 0 and topic is not self._bundle:
            self._topics.pop((topic.kind, topic.key), None)

    # The trust bundle has no resolver: providers push it.
    def bundle_topic(self) -> Topic[Any]:
        self._bundle.subscribers += 1
        return self._bundle

    def set_bundle(self, value: Any) -> bool:
        return self._bundle.publish(value)


def _resolve(resolve: Resolver, state: ClusterState) -> Any:
    try:
        return resolve(state)
    except DestinationError as e:
        return e
    except Exception as e:  # a resolver bug must not take the whole fan-out down
        log.exception("resolver failed")
        return Unavailable(f"internal error while resolving: {type(e).__name__}")
