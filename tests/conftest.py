"""Shared fixtures: explicit times, fresh stores with an anchor and an issuer."""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pki.rotation import init_anchor, issue_issuer
from pki.store import FileStore

# Tests run with --import-mode=importlib (test files of the same name live in several
# folders); each folder's shared helpers (e.g. identity_testkit.py) are importable by name.
sys.path[:0] = sorted(str(d) for d in Path(__file__).parent.iterdir() if d.is_dir())

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def t0() -> datetime:
    return T0


@pytest.fixture
def make_store(tmp_path: Path) -> Callable[..., FileStore]:
    """Build a store with an anchor and an issuer created at ``at``."""

    def build(
        at: datetime = T0,
        *,
        anchor_lifetime: timedelta = timedelta(days=365),
        issuer_lifetime: timedelta = timedelta(hours=48),
        name: str = "store",
    ) -> FileStore:
        store = FileStore(tmp_path / name)
        init_anchor(store, now=at, lifetime=anchor_lifetime)
        issue_issuer(store, now=at, lifetime=issuer_lifetime)
        return store

    return build
