"""Fixtures for the destination tests: mesh files and a real server on 127.0.0.1 port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from destination_testlib import WEB, write_atomic

from destination.service import DestinationServer, ServeOptions


@pytest.fixture
def mesh_file(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.yaml"
    write_atomic(path, WEB)
    return path


@pytest.fixture
async def server(mesh_file: Path) -> AsyncIterator[DestinationServer]:
    srv = DestinationServer(
        ServeOptions(listen="127.0.0.1:0", admin_listen="127.0.0.1:0", mesh_file=mesh_file)
    )
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()
