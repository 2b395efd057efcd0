"""A move's target waits for its instance's registration on the client's ``settled`` event
(agent.mobility.client), not by looking every few milliseconds: it looks once before and
once after each wake-up, and gives up with MigrationFailed at its time limit."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent.hosting.migration import MigrationFailed, MigrationRole
from test_migration_role import FakeAgent, FakeHosting
from test_migration_role import run_dir  # noqa: F401 - autouse: each router its run directory


class EventClient:
    """Registered once ``accept`` runs; counts how often its status is read."""

    def __init__(self) -> None:
        self.settled = asyncio.Event()
        self.looks = 0
        self.registration: dict | None = None
        self.history: list[Any] = []

    def status(self) -> dict:
        self.looks += 1
        return {"registration": self.registration, "at_home": False, "attempts": []}

    def accept(self) -> None:
        self.registration = {"care_of_address": "10.14.0.1"}
        self.settled.set()


def role_with(client: EventClient) -> MigrationRole:
    hosting = FakeHosting()
    hosting.objects["counter"].client = client  # type: ignore[assignment]
    return MigrationRole(FakeAgent(hosting))  # type: ignore[arg-type]


def test_the_target_is_woken_by_the_registration_not_a_poll() -> None:
    client = EventClient()

    async def go() -> dict:
        role = role_with(client)
        asyncio.get_running_loop().call_later(0.05, client.accept)
        return await role.wait_registered("counter", timeout=5.0)

    status = asyncio.run(go())
    assert status["registration"] == {"care_of_address": "10.14.0.1"}
    assert client.looks == 2  # before the wait, and once woken


def test_no_registration_within_the_limit_fails_the_move() -> None:
    client = EventClient()

    async def go() -> None:
        await role_with(client).wait_registered("counter", timeout=0.3)

    with pytest.raises(MigrationFailed, match="did not register"):
        asyncio.run(go())
