"""Promises of the README's threat model that only a removed check would break (issue 18,
point 14): each test here fails when the one line that keeps its promise is taken out."""

from __future__ import annotations

import uuid
from typing import Any

from tests.conftest import Instance
from tests.hostile.conftest import connected
from tests.hostile.rogue import Rogue
from tests.hostile.test_fairness import send, spawn, wait_for_try, wait_state

DEFAULT_MAX_AGENT_TIMEOUT = 24 * 3600  # FEDAGENT_MAX_AGENT_TIMEOUT's default


async def test_a_peer_with_default_grants_cannot_ask_for_more_than_the_instance_timeout(
    hub: Instance, rogue: Rogue
) -> None:
    connection_id = await connected(rogue, hub)  # default grants: no maxTimeout of their own
    try:
        run = spawn("$ true")
        run["options"]["timeout"] = DEFAULT_MAX_AGENT_TIMEOUT + 1
        response = await send(rogue, hub, "agent.spawn", run)
        assert response.status_code == 403, response.text
        assert response.json()["code"] == "grant_timeout"
        assert response.json()["limit"] == DEFAULT_MAX_AGENT_TIMEOUT
        rows = await hub.fetch(
            "SELECT 1 FROM agents WHERE agent_id = $1", uuid.UUID(run["agentId"])
        )
        assert rows == []
    finally:
        await hub.call("POST", f"/connections/{connection_id}/disconnect")


async def test_a_queued_try_is_held_to_a_timeout_grant_lowered_after_the_spawn(
    far: Instance, rogue: Rogue
) -> None:
    # far runs one agent at a time: the queued run starts its try only when the first ends.
    connection_id = await connected(rogue, far)
    try:
        first, queued = spawn(), spawn("$ echo should-not-run", queue=True)
        assert (await send(rogue, far, "agent.spawn", first)).status_code == 200
        await wait_state(far, first["agentId"], {"running"})
        assert (await send(rogue, far, "agent.spawn", queued)).status_code == 200
        await wait_for_try(far, queued["agentId"], rogue.instance_id)
        lowered = queued["options"]["timeout"] - 1
        response = await far.call(
            "PATCH", f"/connections/{connection_id}", json={"grants": {"maxTimeout": lowered}}
        )
        assert response.status_code == 200, response.text
        killed = await send(rogue, far, "agent.kill", {"agentId": first["agentId"]})
        assert killed.status_code == 200, killed.text
        assert await wait_state(far, queued["agentId"], {"failed", "completed"}) == "failed"
        rows = await far.fetch(
            "SELECT error FROM agents WHERE agent_id = $1", uuid.UUID(queued["agentId"])
        )
        assert f"above the {lowered} s allowed" in (rows[0]["error"] or ""), rows
    finally:
        await far.call("POST", f"/connections/{connection_id}/disconnect")


async def member_token(hub: Instance, name: str) -> dict[str, str]:
    response = await hub.call("POST", "/tokens", json={"name": name, "role": "member"})
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['token']}"}


async def test_a_member_cannot_mint_list_or_revoke_tokens(hub: Instance) -> None:
    member = await member_token(hub, f"member-{uuid.uuid4().hex[:8]}")
    victim = await hub.call("POST", "/tokens", json={"name": "victim", "role": "member"})
    victim_id = victim.json()["id"]
    attempts: list[tuple[str, str, dict[str, Any] | None]] = [
        ("POST", "/tokens", {"name": "minted-by-a-member", "role": "admin"}),
        ("GET", "/tokens", None),
        ("DELETE", f"/tokens/{victim_id}", None),
    ]
    for method, path, body in attempts:
        response = await hub.call(method, path, json=body, headers=member)
        assert response.status_code == 403, (path, response.text)
        assert response.json()["code"] == "forbidden"
    rows = await hub.fetch("SELECT 1 FROM api_tokens WHERE name = 'minted-by-a-member'")
    assert rows == []
    listed = {t["id"]: t["state"] for t in (await hub.call("GET", "/tokens")).json()}
    assert listed[victim_id] == "active"


async def test_a_member_cannot_see_or_kill_the_hosted_runs_peers_started_here(
    hub: Instance,
) -> None:
    member = await member_token(hub, f"member-{uuid.uuid4().hex[:8]}")
    some_run = uuid.uuid4()
    for method, path in (
        ("GET", "/hosted"),
        ("GET", f"/hosted/{some_run}"),
        ("POST", f"/hosted/{some_run}/kill"),
    ):
        response = await hub.call(method, path, headers=member)
        assert response.status_code == 403, (path, response.text)
        assert response.json()["code"] == "forbidden"
