"""A user on hub spawns agents on spoke: connect, complete, kill, idempotency, refusals."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from cli.devstack import DevStack
from tests.conftest import Instance, connect
from tests.e2e.helpers import processes_in, spawn_body

pytestmark = pytest.mark.e2e


async def test_connection_is_pending_until_accepted_then_active_on_both_sides(
    edge: Instance, spoke: Instance
) -> None:
    response = await edge.call("POST", "/connections", json={"remoteUrl": spoke.url})
    assert response.status_code == 201, response.text
    connection_id = response.json()["connectionId"]
    assert response.json()["status"] == "PENDING"

    on_spoke = await spoke.call("GET", f"/connections/{connection_id}")
    assert on_spoke.json()["status"] == "PENDING"
    assert on_spoke.json()["direction"] == "inbound"
    assert on_spoke.json()["remoteInstanceId"] == edge.id

    # Only the asked side may accept.
    refused = await edge.call("POST", f"/connections/{connection_id}/accept")
    assert refused.status_code == 409
    assert refused.json()["code"] == "connection_state_conflict"

    accepted = await spoke.call("POST", f"/connections/{connection_id}/accept")
    assert accepted.json()["status"] == "ACTIVE"
    on_edge = await edge.call("GET", f"/connections/{connection_id}")
    assert on_edge.json()["status"] == "ACTIVE"

    ended = await edge.call("POST", f"/connections/{connection_id}/disconnect")
    assert ended.json()["status"] == "DISCONNECTED"
    assert ended.json()["peerNotified"] is True
    on_spoke = await spoke.call("GET", f"/connections/{connection_id}")
    assert on_spoke.json()["status"] == "DISCONNECTED"


async def test_spawn_completes_with_result_on_both_sides(
    hub: Instance, spoke: Instance, hub_spoke: str, stack: DevStack
) -> None:
    body = spawn_body(hub_spoke, "$ echo hi > out.txt\n$ cat out.txt", task_id="complete-1")
    response = await hub.call("POST", "/agents/spawn", json=body)
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted == {
        "agentId": body["agentId"],
        "state": "spawning",
        "workflowId": f"remote-agent/{body['agentId']}",
    }

    agent = await hub.wait_agent(body["agentId"])
    assert agent["state"] == "completed", agent
    assert agent["result"]["exitCodes"] == [0, 0]
    assert "hi" in agent["result"]["logTail"]
    assert agent["startedAt"] and agent["finishedAt"]

    rows = await spoke.fetch(
        "SELECT state, workflow_id FROM agents WHERE role = 'executor' AND agent_id = $1",
        uuid.UUID(body["agentId"]),
    )
    assert [(r["state"], r["workflow_id"]) for r in rows] == [
        ("completed", f"agent-run/{hub.id}/{body['agentId']}")
    ]
    workspace = stack.data_dir / "workspaces" / "spoke" / hub.id / body["agentId"]
    assert (workspace / "out.txt").read_text() == "hi\n"


async def test_failing_command_fails_the_agent(hub: Instance, hub_spoke: str) -> None:
    body = spawn_body(hub_spoke, "$ echo before\n$ exit 3\n$ echo never", task_id="fail-1")
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    agent = await hub.wait_agent(body["agentId"])
    assert agent["state"] == "failed"
    assert "a command failed" in (agent["error"] or "")


async def test_kill_stops_the_agent_and_leaves_no_process(
    hub: Instance, spoke: Instance, hub_spoke: str, stack: DevStack
) -> None:
    body = spawn_body(hub_spoke, "$ echo hi > out.txt\n$ sleep 300", task_id="kill-1", timeout=600)
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    workspace = stack.data_dir / "workspaces" / "spoke" / hub.id / body["agentId"]
    for _ in range(300):
        # The sandbox's short-lived processes (workspace setup, `echo`) come and go first.
        agent = (await hub.call("GET", f"/agents/{body['agentId']}")).json()
        if (agent.get("progress") or {}).get("command") == "sleep 300" and processes_in(workspace):
            break
        await asyncio.sleep(0.1)
    assert processes_in(workspace), "the agent's sleep never started"

    response = await hub.call("POST", f"/agents/{body['agentId']}/kill")
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "killed"
    # Acknowledged means gone: nothing of the agent is left on the machine right now.
    assert processes_in(workspace) == []

    agent = await hub.wait_agent(body["agentId"])
    assert agent["state"] == "killed"
    rows = await spoke.fetch(
        "SELECT state FROM agents WHERE role = 'executor' AND agent_id = $1",
        uuid.UUID(body["agentId"]),
    )
    assert [r["state"] for r in rows] == ["killed"]
    # Killing a finished agent answers its final state and changes nothing.
    again = await hub.call("POST", f"/agents/{body['agentId']}/kill")
    assert again.json()["state"] == "killed"


async def test_same_agent_id_spawned_twice_runs_once(
    hub: Instance, spoke: Instance, hub_spoke: str, stack: DevStack
) -> None:
    body = spawn_body(hub_spoke, "$ echo ran >> runs.txt\n$ sleep 1", task_id="idem-1")
    first, second = await asyncio.gather(
        hub.call("POST", "/agents/spawn", json=body), hub.call("POST", "/agents/spawn", json=body)
    )
    assert first.status_code == second.status_code == 202
    assert first.json()["workflowId"] == second.json()["workflowId"]
    assert (await hub.wait_agent(body["agentId"]))["state"] == "completed"

    third = await hub.call("POST", "/agents/spawn", json=body)  # after it finished
    assert third.status_code == 202
    assert third.json()["state"] == "completed"
    workspace = stack.data_dir / "workspaces" / "spoke" / hub.id / body["agentId"]
    assert (workspace / "runs.txt").read_text() == "ran\n"
    query = f"AgentId = '{body['agentId']}'"
    assert await spoke.count_workflows(query) == 1
    assert await hub.count_workflows(query) == 1

    changed = {**body, "taskId": "something-else"}
    conflict = await hub.call("POST", "/agents/spawn", json=changed)
    assert conflict.status_code == 409
    assert conflict.json()["code"] == "agent_id_conflict"


async def test_spawn_on_a_connection_that_is_not_active_is_refused(
    hub: Instance, edge: Instance
) -> None:
    response = await hub.call("POST", "/connections", json={"remoteUrl": edge.url})
    assert response.status_code == 201, response.text
    pending = response.json()["connectionId"]
    body = spawn_body(pending, "$ echo never")
    refused = await hub.call("POST", "/agents/spawn", json=body)
    assert refused.status_code == 409
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["code"] == "connection_not_active"
    assert "PENDING" in refused.json()["detail"]
    rows = await hub.fetch("SELECT 1 FROM agents WHERE agent_id = $1", uuid.UUID(body["agentId"]))
    assert rows == []
    assert await hub.count_workflows(f"AgentId = '{body['agentId']}'") == 0

    unknown = await hub.call("POST", "/agents/spawn", json=spawn_body(str(uuid.uuid4()), "$ true"))
    assert unknown.status_code == 404
    assert unknown.json()["code"] == "connection_not_found"


async def test_bad_spawn_requests_get_problem_json_naming_the_field(
    hub: Instance, hub_spoke: str
) -> None:
    body = spawn_body(hub_spoke, "$ true")
    body["agentType"] = "overlord"
    body["options"]["timeout"] = -5
    response = await hub.call("POST", "/agents/spawn", json=body)
    assert response.status_code == 422
    problem = response.json()
    assert problem["code"] == "validation_error"
    fields = {e["field"] for e in problem["errors"]}
    assert {"agentType", "options.timeout"} <= fields
    assert await hub.count_workflows(f"AgentId = '{body['agentId']}'") == 0

    no_token = await hub.http.post(f"{hub.url}/api/v1/federation/agents/spawn", json=body)
    assert no_token.status_code == 401
    assert no_token.json()["code"] == "unauthenticated"


async def test_identity_card_is_public_and_has_no_private_key(hub: Instance) -> None:
    response = await hub.http.get(f"{hub.url}/api/v1/federation/instance")
    assert response.status_code == 200
    card = response.json()
    assert card["instanceId"] == hub.id
    assert card["name"] == "hub"
    assert card["keys"][0]["algorithm"] == "Ed25519"
    assert "PRIVATE" not in response.text


async def test_reconnecting_through_an_existing_connection_is_refused(
    hub: Instance, spoke: Instance, hub_spoke: str
) -> None:
    response = await hub.call("POST", "/connections", json={"remoteUrl": spoke.url})
    assert response.status_code == 409
    assert response.json()["code"] == "connection_state_conflict"


__all__ = ["connect"]
