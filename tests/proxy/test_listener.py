"""Listeners: an address that cannot be bound is a ListenError naming the listener."""

from __future__ import annotations

import socket

import pytest

from proxy.errors import ListenError
from proxy.listener import serve


async def test_an_address_in_use_names_the_listener_and_the_reason() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenError) as refused:
            await serve("127.0.0.1", port, lambda link: link.close(), what="outbound")
    assert (
        str(refused.value)
        == f"cannot listen on 127.0.0.1:{port} (outbound): Address already in use"
    )


async def test_an_address_that_is_not_local_is_refused() -> None:
    with pytest.raises(ListenError, match=r"cannot listen on 192\.0\.2\.1:0 \(inbound\): "):
        await serve("192.0.2.1", 0, lambda link: link.close(), what="inbound")
