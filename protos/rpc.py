"""The contract between TrustMesh's gRPC clients and the channel that carries their calls.

The identity and destination clients speak to their services through a channel they are given
(the proxy's is :class:`proxy.rpc.Channel`, gRPC over HTTP/2 and TLS 1.3 without grpcio). This
module holds what both sides must agree on: gRPC's status codes (numbered as the gRPC protocol
fixes them), the one exception a call raises for a status other than OK, and the channel's
shape. Messages cross it as serialized protobuf bytes.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from typing import Protocol


class StatusCode(enum.IntEnum):
    """gRPC status codes (the numbers are the protocol's)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class RpcError(Exception):
    """A call ended with a status other than OK: the server's, or one the channel decided
    (UNAVAILABLE when it cannot connect, DEADLINE_EXCEEDED, CANCELLED when closed)."""

    def __init__(self, code: StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class Stream(Protocol):
    """A server-streaming call: each item is one serialized response message.

    Iteration ends after an OK status and raises :class:`RpcError` for any other.
    """

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    def cancel(self) -> None:
        """Abandon the call (the server sees it cancelled); further iteration ends."""


class Channel(Protocol):
    """Calls to one service over connections the channel makes, and makes again when one fails."""

    @property
    def closed(self) -> bool: ...

    async def unary(self, method: str, request: bytes, *, timeout: float) -> bytes:
        """One request, one response; ``method`` is the path ``/package.Service/Method``."""

    def stream(self, method: str, request: bytes) -> Stream:
        """A call answered by a stream of messages (opened on first iteration)."""

    async def ready(self) -> None:
        """Wait until a connection is established (retrying; bound it with a timeout)."""

    async def close(self) -> None:
        """Close the connection; calls still open end with CANCELLED."""


class ChannelFactory(Protocol):
    """Opens a channel to ``target`` (``host:port``): plaintext without ``server_name``, else
    TLS verified against ``roots_pem`` (PEM anchors) for the name ``server_name``."""

    def __call__(
        self, target: str, *, roots_pem: bytes | None, server_name: str | None
    ) -> Channel: ...


__all__ = ["Channel", "ChannelFactory", "RpcError", "StatusCode", "Stream"]
