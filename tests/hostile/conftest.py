"""Fixtures of the hostile-peer suite: rogue instances on loopback, each with its own key."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.conftest import Instance
from tests.hostile.rogue import Rogue

RogueFactory = Callable[..., Awaitable[Rogue]]


@pytest.fixture
async def make_rogue() -> AsyncIterator[RogueFactory]:
    started: list[Rogue] = []

    async def make(host: str = "127.0.0.1", instance_id: str | None = None) -> Rogue:
        rogue = await Rogue(host, instance_id).start()
        started.append(rogue)
        return rogue

    yield make
    for rogue in started:
        await rogue.stop()


@pytest.fixture
async def rogue(make_rogue: RogueFactory) -> Rogue:
    return await make_rogue()


async def connected(rogue: Rogue, executor: Instance, grants: dict[str, Any] | None = None) -> str:
    """The rogue asks `executor` for a connection and executor's admin accepts it."""
    request = rogue.connection_request(executor.id)
    response = await rogue.post(executor.url, "connect", request)
    assert response.status_code == 200, response.text
    connection_id: str = request["payload"]["connectionId"]
    body = {"grants": grants} if grants else None
    response = await executor.call("POST", f"/connections/{connection_id}/accept", json=body)
    assert response.status_code == 200, response.text
    return connection_id


async def connection_rows(inst: Instance, remote_instance_id: str) -> list[Any]:
    return await inst.fetch(
        "SELECT * FROM connections WHERE remote_instance_id = $1", remote_instance_id
    )
