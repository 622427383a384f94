"""The identity service's admin port, served for real on 127.0.0.1."""

from __future__ import annotations

from alerts_testkit import assert_admin_drops_an_unread_answer

import identity.admin as admin_module


async def test_a_client_that_never_reads_its_answer_does_not_hold_the_handler(
    monkeypatch,
) -> None:
    await assert_admin_drops_an_unread_answer(admin_module.AdminServer, admin_module, monkeypatch)
