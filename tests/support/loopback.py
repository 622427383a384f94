"""Loopback addresses for tests, shared by every test folder (each folder is on sys.path)."""

from __future__ import annotations

import socket


def unused_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (bound, then released): for a server a test starts later
    on a known address, or an endpoint whose connections are refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
