"""Local runs (issue 23, point 1): an instance runs agents for its own users, with no peer.

`POST /agents/spawn` without a connectionId starts the executor's durable run here; the users
see it through the same views as an agent spawned on a peer (state, list, events, transcript,
diff, kill), within grants-like limits of local runs (agent types, repositories, timeout,
unfinished runs per workspace)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from cli.devstack import DevStack
from tests.conftest import Instance
from tests.e2e.test_users import bearer, cli_token

pytestmark = pytest.mark.e2e


def local_body(instructions: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "agentId": str(uuid.uuid4()),
        "taskId": "local-task",
        "agentType": "worker",
        "context": {"instructions": instructions},
        "options": {"timeout": 60},
    }
    body.update(extra)
    return body


async def sse_events(instance: Instance, agent_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with instance.http.stream(
        "GET",
        f"{instance.url}/api/v1/federation/agents/{agent_id}/events",
        headers=instance.auth,
        timeout=60,
    ) as response:
        assert response.status_code == 200
        kind = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append({"event": kind, **json.loads(line[6:])})
    return events


async def test_a_local_run_completes_here_and_shows_in_the_same_views(hub: Instance) -> None:
    body = local_body("$ echo hello > hello.txt")
    spawned = await hub.call("POST", "/agents/spawn", json=body)
    assert spawned.status_code == 202, spawned.text
    agent_id = body["agentId"]
    assert spawned.json()["workflowId"] == f"agent-run/_local/{agent_id}"
    agent = await hub.wait_agent(agent_id)
    assert agent["state"] == "completed", agent
    assert agent["peerInstanceId"] == "_local"
    # One row: the run, nothing on any peer, no signed message sent.
    rows = await hub.fetch("SELECT role FROM agents WHERE agent_id = $1", uuid.UUID(agent_id))
    assert [r["role"] for r in rows] == ["executor"]
    sent = await hub.fetch(
        "SELECT count(*) AS n FROM messages WHERE agent_id = $1", uuid.UUID(agent_id)
    )
    assert sent[0]["n"] == 0
    listed = await hub.call("GET", "/agents", params={"taskId": "local-task", "limit": 500})
    assert agent_id in [a["agentId"] for a in listed.json()]
    # Not a peer's run: the hosted view (runs peers started here) leaves it out.
    hosted = await hub.call("GET", "/hosted", params={"limit": 500})
    assert agent_id not in [a["agentId"] for a in hosted.json()]
    diff = await hub.call("GET", f"/agents/{agent_id}/diff")
    assert diff.status_code == 200, diff.text
    assert "hello.txt" in diff.text and diff.headers["content-type"].startswith("text/x-diff")
    transcript = await hub.call("GET", f"/agents/{agent_id}/transcript")
    page = transcript.json()
    assert page["complete"] and page["entries"], page
    events = await sse_events(hub, agent_id)
    states = [e["state"] for e in events if e["event"] == "state"]
    assert states[0] == "spawning" and states[-1] == "completed" and "running" in states
    assert any(e["event"] == "transcript" for e in events)


async def test_the_same_agent_id_is_one_local_run(hub: Instance) -> None:
    body = local_body("$ echo once")
    first = await hub.call("POST", "/agents/spawn", json=body)
    again = await hub.call("POST", "/agents/spawn", json=body)
    assert first.status_code == again.status_code == 202, again.text
    other = await hub.call("POST", "/agents/spawn", json={**body, "taskId": "another-task"})
    assert other.status_code == 409 and other.json()["code"] == "agent_id_conflict"
    await hub.wait_agent(body["agentId"])
    client = await hub.temporal()
    runs = [w async for w in client.list_workflows(f"AgentId = '{body['agentId']}'")]
    assert len(runs) == 1


async def test_a_local_run_is_killed_once_its_sandbox_is_gone(hub: Instance) -> None:
    body = local_body("$ sleep 30")
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    await hub.wait_agent(body["agentId"], {"running"})
    killed = await hub.call("POST", f"/agents/{body['agentId']}/kill")
    assert killed.status_code == 200, killed.text
    assert killed.json()["state"] == "killed"


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"options": {"timeout": 5 * 24 * 3600}}, "grant_timeout"),
        ({"context": {"repository": "https://elsewhere.example/x.git"}}, "grant_repository"),
        ({"agentType": "tester"}, "grant_agent_type"),
        ({"surprise": 1}, "validation_error"),
    ],
)
async def test_a_local_spawn_past_the_limits_is_refused_and_leaves_nothing(
    edge: Instance, change: dict[str, Any], code: str
) -> None:
    body = local_body("$ echo no", **change)
    refused = await edge.call("POST", "/agents/spawn", json=body)
    assert refused.status_code in (403, 422), refused.text
    assert refused.json()["code"] == code
    rows = await edge.fetch("SELECT 1 FROM agents WHERE agent_id = $1", uuid.UUID(body["agentId"]))
    assert rows == []


async def test_a_workspace_runs_at_most_its_limit_of_local_runs(
    stack: DevStack, edge: Instance
) -> None:
    carol = bearer(await cli_token(stack, "edge", "member", "ws-local", "carol"))
    dave = bearer(await cli_token(stack, "edge", "member", "ws-other", "dave"))
    first = local_body("$ sleep 30")
    assert (await edge.call("POST", "/agents/spawn", json=first, headers=carol)).status_code == 202
    second = local_body("$ echo two")
    refused = await edge.call("POST", "/agents/spawn", json=second, headers=carol)
    assert refused.status_code == 429 and refused.json()["code"] == "capacity_exceeded"
    assert (
        await edge.fetch("SELECT 1 FROM agents WHERE agent_id = $1", uuid.UUID(second["agentId"]))
        == []
    )
    # Another workspace has its own count; and it cannot see or kill carol's run.
    other = local_body("$ echo other")
    assert (await edge.call("POST", "/agents/spawn", json=other, headers=dave)).status_code == 202
    seen = await edge.call("GET", f"/agents/{first['agentId']}", headers=dave)
    assert seen.status_code == 404
    assert (
        await edge.call("POST", f"/agents/{first['agentId']}/kill", headers=dave)
    ).status_code == 404
    killed = await edge.call("POST", f"/agents/{first['agentId']}/kill", headers=carol)
    assert killed.json()["state"] == "killed"
