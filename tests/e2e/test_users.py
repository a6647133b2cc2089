"""Local users: tokens made by `fedagent token create --instance`, roles and workspaces, what a
member may not see or do, and the audit log (admin only, append-only, filtered and paged)."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from cli.devstack import DevStack
from tests.conftest import Instance
from tests.e2e.helpers import spawn_body

pytestmark = pytest.mark.e2e


async def cli_token(stack: DevStack, instance: str, role: str, workspace: str, name: str) -> str:
    """A token made the way an operator makes one (stack.data_dir holds instances.json)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        "token",
        "create",
        "--instance",
        instance,
        "--data-dir",
        str(stack.data_dir),
        "--role",
        role,
        "--workspace",
        workspace,
        "--name",
        name,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    token = out.decode().strip().splitlines()[-1]
    assert token.startswith("fa_")
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_member_sees_and_acts_on_its_own_workspace_only(
    stack: DevStack, hub: Instance, hub_spoke: str
) -> None:
    alice = bearer(await cli_token(stack, "hub", "member", "ws-a", "alice"))
    bob = bearer(await cli_token(stack, "hub", "member", "ws-b", "bob"))
    # The token is stored hashed only.
    rows = await hub.fetch("SELECT token_hash FROM api_tokens WHERE name IN ('alice', 'bob')")
    assert len(rows) == 2 and all(not r["token_hash"].startswith("fa_") for r in rows)

    body = spawn_body(hub_spoke, "$ sleep 30", task_id="ws-b-task", timeout=60)
    spawned = await hub.call("POST", "/agents/spawn", json=body, headers=bob)
    assert spawned.status_code == 202, spawned.text
    agent_id = body["agentId"]
    await hub.wait_agent(agent_id, {"running"})

    # alice (workspace A) cannot see it, list it or kill it: to her it does not exist.
    seen = await hub.call("GET", f"/agents/{agent_id}", headers=alice)
    assert (seen.status_code, seen.json()["code"]) == (404, "agent_not_found")
    listed = await hub.call("GET", "/agents", params={"limit": 500}, headers=alice)
    assert agent_id not in {a["agentId"] for a in listed.json()}
    killed = await hub.call("POST", f"/agents/{agent_id}/kill", headers=alice)
    assert (killed.status_code, killed.json()["code"]) == (404, "agent_not_found")
    events = await hub.call("GET", f"/agents/{agent_id}/events", headers=alice)
    assert events.status_code == 404
    # Nor reuse its agentId for a spawn of her own.
    again = await hub.call("POST", "/agents/spawn", json=body, headers=alice)
    assert (again.status_code, again.json()["code"]) == (409, "agent_id_conflict")
    assert (await hub.call("GET", f"/agents/{agent_id}", headers=bob)).json()["state"] == "running"

    # Commands: bob asks spoke for its status; alice can neither ask nor see bob's command.
    status_command = {
        "connectionId": hub_spoke,
        "commandType": "agent.status",
        "payload": {"agentId": agent_id},
    }
    sent = await hub.call("POST", "/command", json=status_command, headers=bob)
    assert sent.status_code == 201, sent.text
    command = sent.json()
    assert command["status"] == "answered" and command["response"]["state"] == "running"
    assert command["workspace"] == "ws-b" and command["actor"] == "user:bob"
    denied = await hub.call("POST", "/command", json=status_command, headers=alice)
    assert (denied.status_code, denied.json()["code"]) == (404, "agent_not_found")
    hidden = await hub.call("GET", f"/commands/{command['commandId']}", headers=alice)
    assert (hidden.status_code, hidden.json()["code"]) == (404, "command_not_found")
    mine = await hub.call("GET", "/commands", headers=alice)
    assert command["commandId"] not in {c["commandId"] for c in mine.json()}
    theirs = await hub.call("GET", "/commands", headers=bob)
    assert command["commandId"] in {c["commandId"] for c in theirs.json()}
    read = await hub.call("GET", f"/commands/{command['commandId']}")
    assert read.json()["messageId"] == command["messageId"]
    kill_command = {**status_command, "commandType": "agent.kill"}
    refused = await hub.call("POST", "/command", json=kill_command, headers=bob)
    assert (refused.status_code, refused.json()["code"]) == (422, "validation_error")

    # bob sees it, the admin sees it, bob kills it.
    listed = await hub.call("GET", "/agents", params={"limit": 500}, headers=bob)
    assert agent_id in {a["agentId"] for a in listed.json()}
    assert (await hub.call("GET", f"/agents/{agent_id}")).status_code == 200
    killed = await hub.call("POST", f"/agents/{agent_id}/kill", headers=bob)
    assert killed.status_code == 200 and killed.json()["state"] == "killed"

    actions = await hub.fetch(
        "SELECT actor, action FROM audit_log WHERE details->>'agentId' = $1 ORDER BY id", agent_id
    )
    assert [(r["actor"], r["action"]) for r in actions] == [
        ("user:bob", "agent.spawn"),
        ("user:bob", "command.agent.status"),
        ("user:bob", "agent.kill"),
    ]


ADMIN_ONLY: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/instance/keys/rotate", {}),
    ("PATCH", "/instance", {"name": "taken-over"}),
    ("GET", "/audit", None),
    ("GET", "/connections", None),
    ("POST", "/connections", {"remoteUrl": "http://127.0.0.1:9"}),
]


async def test_a_member_cannot_change_keys_configuration_connections_or_read_the_audit(
    stack: DevStack, hub: Instance, hub_spoke: str
) -> None:
    member = bearer(await cli_token(stack, "hub", "member", "ws-a", "mallory"))
    before = (await hub.http.get(f"{hub.url}/api/v1/federation/instance")).json()
    requests = [
        *ADMIN_ONLY,
        ("GET", f"/connections/{hub_spoke}", None),
        ("PATCH", f"/connections/{hub_spoke}", {"grants": {"maxTimeout": 1}}),
        ("POST", f"/connections/{hub_spoke}/suspend", None),
        ("POST", f"/connections/{hub_spoke}/disconnect", None),
    ]
    for method, path, body in requests:
        response = await hub.call(method, path, json=body, headers=member)
        assert (response.status_code, response.json()["code"]) == (403, "forbidden"), path
    after = (await hub.http.get(f"{hub.url}/api/v1/federation/instance")).json()
    assert after["keys"] == before["keys"] and after["name"] == before["name"]
    connection = await hub.call("GET", f"/connections/{hub_spoke}")
    assert connection.json()["status"] == "ACTIVE"
    assert connection.json()["grants"].get("maxTimeout") != 1

    for headers in ({}, bearer("fa_not-a-token"), {"Authorization": "Basic abc"}):
        response = await hub.http.post(
            f"{hub.url}/api/v1/federation/instance/keys/rotate", headers=headers
        )
        assert (response.status_code, response.json()["code"]) == (401, "unauthenticated")


async def test_the_audit_log_is_append_only_and_can_be_filtered_and_paged(
    hub: Instance, spoke: Instance, hub_spoke: str
) -> None:
    conn: asyncpg.Connection = await hub.db()
    try:
        for statement in (
            "UPDATE audit_log SET outcome = 'ok'",
            "DELETE FROM audit_log",
            "TRUNCATE audit_log",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(statement)
    finally:
        await conn.close()

    # Produce a few refusals of our own to page through.
    marker = str(uuid.uuid4())
    for _ in range(5):
        response = await spoke.http.post(
            f"{spoke.url}/api/v1/federation/incoming/command",
            json={"protocol": "fedagent/1", "senderId": marker},
        )
        assert response.status_code == 422
    actor = f"peer:{marker}"
    page = await spoke.call("GET", "/audit", params={"actor": actor, "limit": 2})
    assert page.status_code == 200, page.text
    first = page.json()
    assert len(first["items"]) == 2 and first["nextBefore"] is not None
    seen = [item["id"] for item in first["items"]]
    cursor = first["nextBefore"]
    while cursor is not None:
        more = (
            await spoke.call("GET", "/audit", params={"actor": actor, "limit": 2, "before": cursor})
        ).json()
        seen += [item["id"] for item in more["items"]]
        cursor = more["nextBefore"]
    assert len(seen) == 5 and seen == sorted(seen, reverse=True)
    item = first["items"][0]
    assert (item["action"], item["outcome"], item["details"]["code"]) == (
        "incoming.command",
        "refused",
        "envelope_malformed",
    )

    filtered = await spoke.call(
        "GET",
        "/audit",
        params={"action": "incoming.*", "outcome": "refused", "actor": actor, "limit": 100},
    )
    assert len(filtered.json()["items"]) == 5
    none = await spoke.call("GET", "/audit", params={"actor": actor, "outcome": "ok"})
    assert none.json()["items"] == []
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    later = await spoke.call("GET", "/audit", params={"since": future})
    assert later.json() == {"items": [], "nextBefore": None}
    bad = await spoke.call("GET", "/audit", params={"limit": 0})
    assert (bad.status_code, bad.json()["code"]) == (422, "validation_error")


async def test_admin_changes_name_capabilities_and_metadata(
    spoke: Instance, edge: Instance, edge_spoke_request: str
) -> None:
    card = (await spoke.http.get(f"{spoke.url}/api/v1/federation/instance")).json()
    assert card["limits"]["maxBodyBytes"] == 1024 * 1024
    assert card["limits"]["timestampWindow"] == 300
    assert set(card["capabilities"]) >= {"agentTypes", "commandTypes", "sandboxes"}
    original = {
        "name": card["name"],
        "capabilities": {"agentTypes": card["capabilities"]["agentTypes"]},
        "metadata": card["metadata"],
    }
    try:
        changed = await spoke.call(
            "PATCH",
            "/instance",
            json={
                "name": "spoke-eu",
                "capabilities": {"agentTypes": ["worker"]},
                "metadata": {"region": "eu-west"},
            },
        )
        assert changed.status_code == 200, changed.text
        card = (await spoke.http.get(f"{spoke.url}/api/v1/federation/instance")).json()
        assert card["name"] == "spoke-eu"
        assert card["capabilities"]["agentTypes"] == ["worker"]
        assert card["capabilities"]["commandTypes"] == [
            "agent.spawn",
            "agent.status",
            "agent.kill",
            "agent.artifact",
        ]
        assert card["metadata"] == {"region": "eu-west"}

        # What it no longer offers, no peer gets, whatever the connection's grants say.
        cid = edge_spoke_request
        assert (await spoke.call("POST", f"/connections/{cid}/accept")).status_code == 200
        body = spawn_body(cid, "$ echo tester", agent_type="tester", task_id="not-offered")
        assert (await edge.call("POST", "/agents/spawn", json=body)).status_code == 202
        agent = await edge.wait_agent(body["agentId"])
        assert agent["state"] == "failed" and "grant_agent_type" in (agent["error"] or "")

        audit = await spoke.fetch(
            "SELECT details FROM audit_log WHERE action = 'instance.update' ORDER BY id DESC"
            " LIMIT 1"
        )
        changes = json.loads(audit[0]["details"])["changes"]
        assert changes["name"] == {"from": original["name"], "to": "spoke-eu"}
        assert changes["metadata"]["to"] == {"region": "eu-west"}

        for bad, field in (
            ({"name": ""}, "name"),
            ({"colour": "red"}, "colour"),
            ({"capabilities": {"agentTypes": ["wizard"]}}, "capabilities.agentTypes.0"),
        ):
            response = await spoke.call("PATCH", "/instance", json=bad)
            assert (response.status_code, response.json()["code"]) == (422, "validation_error")
            assert field in [e["field"] for e in response.json()["errors"]]
    finally:
        restored = await spoke.call("PATCH", "/instance", json=original)
        assert restored.status_code == 200, restored.text


async def test_the_card_is_public_and_holds_no_secrets(spoke: Instance) -> None:
    async with httpx.AsyncClient() as anonymous:
        card = await anonymous.get(f"{spoke.url}/api/v1/federation/instance")
    assert card.status_code == 200
    text = card.text
    assert "PRIVATE" not in text and "sealed" not in text and "aesgcm" not in text
    for key in card.json()["keys"]:
        assert set(key) == {"keyId", "algorithm", "publicKey", "status", "validFrom", "validUntil"}
