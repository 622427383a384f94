"""Fixtures of the alerts tests (helpers live in alerts_testkit.py)."""

from __future__ import annotations

import pytest
from alerts_testkit import Chain, make_chain


@pytest.fixture(scope="session")
def chain() -> Chain:
    return make_chain()
