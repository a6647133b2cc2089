"""A connection this instance asked for grants the peer nothing (issue 12, hole d, point 7)."""

from __future__ import annotations

import uuid
from typing import Any

from tests.conftest import Instance
from tests.hostile.rogue import Rogue


def spawn(agent_id: str | None = None) -> dict[str, Any]:
    return {
        "agentId": agent_id or str(uuid.uuid4()),
        "taskId": "t-hostile",
        "agentType": "worker",
        "context": {"repository": "example/repo", "instructions": "$ echo pwned > /tmp/pwned"},
        "options": {"timeout": 60, "maxRetries": 0},
    }


async def hub_asks(hub: Instance, rogue: Rogue, grants: dict[str, Any] | None = None) -> str:
    body: dict[str, Any] = {"remoteUrl": rogue.url}
    if grants is not None:
        body["grants"] = grants
    response = await hub.call("POST", "/connections", json=body)
    assert response.status_code == 201, response.text
    connection_id: str = response.json()["connectionId"]
    accept = rogue.envelope(
        "CONNECT", hub.id, {"connectionId": connection_id}, command_type="connection.accept"
    )
    response = await rogue.post(hub.url, "connect", accept)
    assert response.status_code == 200, response.text
    return connection_id


async def test_peer_this_instance_asked_cannot_run_commands_here(
    hub: Instance, rogue: Rogue
) -> None:
    connection_id = await hub_asks(hub, rogue)
    try:
        command = rogue.envelope("COMMAND", hub.id, spawn(), command_type="agent.spawn")
        response = await rogue.post(hub.url, "command", command)
        assert response.status_code == 403, response.text
        assert response.json()["code"] == "grant_command_type"
        agent_id = uuid.UUID(command["payload"]["agentId"])
        assert await hub.fetch("SELECT 1 FROM agents WHERE agent_id = $1", agent_id) == []
        status = rogue.envelope(
            "COMMAND", hub.id, {"agentId": str(uuid.uuid4())}, command_type="agent.status"
        )
        response = await rogue.post(hub.url, "command", status)
        assert response.status_code == 403, response.text
        connection = (await hub.call("GET", f"/connections/{connection_id}")).json()
        assert connection["grants"]["commandTypes"] == []
    finally:
        await hub.call("POST", f"/connections/{connection_id}/disconnect")


async def test_grants_given_when_asking_are_what_the_peer_may_do(
    hub: Instance, rogue: Rogue
) -> None:
    connection_id = await hub_asks(hub, rogue, {"commandTypes": ["agent.status"]})
    try:
        connection = (await hub.call("GET", f"/connections/{connection_id}")).json()
        assert connection["grants"]["commandTypes"] == ["agent.status"]
        command = rogue.envelope("COMMAND", hub.id, spawn(), command_type="agent.spawn")
        response = await rogue.post(hub.url, "command", command)
        assert response.status_code == 403, response.text
        status = rogue.envelope(
            "COMMAND", hub.id, {"agentId": str(uuid.uuid4())}, command_type="agent.status"
        )
        response = await rogue.post(hub.url, "command", status)
        assert response.status_code == 404, response.text  # allowed, and there is no such agent
    finally:
        await hub.call("POST", f"/connections/{connection_id}/disconnect")


async def test_identity_card_says_a_requester_grants_nothing(hub: Instance) -> None:
    card = (await hub.http.get(f"{hub.url}/api/v1/federation/instance")).json()
    assert card["limits"]["requesterGrants"]["commandTypes"] == []
