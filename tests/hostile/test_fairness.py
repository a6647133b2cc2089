"""One peer cannot hold every slot, and ending its connection ends its runs (issue 12, points 4
and 8). `edge` runs with FEDAGENT_PEER_MAX_RUNNING_AGENTS=1 and
FEDAGENT_PEER_MAX_QUEUED_AGENTS=1."""

from __future__ import annotations

import asyncio
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Instance
from tests.hostile.conftest import RogueFactory, connected
from tests.hostile.rogue import Rogue


def spawn(instructions: str = "$ sleep 120", *, queue: bool = False, **kw: Any) -> dict[str, Any]:
    return {
        "agentId": kw.get("agent_id") or str(uuid.uuid4()),
        "taskId": "t-hostile",
        "agentType": "worker",
        "context": {"instructions": instructions},
        "options": {"timeout": 300, "maxRetries": 0, "queue": queue},
    }


async def send(rogue: Rogue, executor: Instance, command: str, payload: Any) -> httpx.Response:
    envelope = rogue.envelope("COMMAND", executor.id, payload, command_type=command)
    return await rogue.post(executor.url, "command", envelope)


async def wait_state(executor: Instance, agent_id: str, states: set[str]) -> str:
    deadline = time.monotonic() + 120
    while True:
        rows = await executor.fetch(
            "SELECT state FROM agents WHERE role = 'executor' AND agent_id = $1",
            uuid.UUID(agent_id),
        )
        if rows and rows[0]["state"] in states:
            return str(rows[0]["state"])
        assert time.monotonic() < deadline, f"agent {agent_id} still {rows}"
        await asyncio.sleep(0.2)


async def wait_for_try(executor: Instance, agent_id: str, peer: str) -> None:
    """Until the run was admitted and its try waits for a free agent slot."""
    client = await executor.temporal()
    handle = client.get_workflow_handle(f"agent-run/{peer}/{agent_id}")
    deadline = time.monotonic() + 120
    while True:
        described = await handle.describe()
        pending = described.raw_description.pending_activities
        if any(a.activity_type.name == "run_agent" for a in pending):
            return
        assert time.monotonic() < deadline, f"run {agent_id} never reached its try"
        await asyncio.sleep(0.2)


async def test_one_peer_gets_its_limit_and_a_short_queue_and_suspending_kills_them_all(
    edge: Instance, rogue: Rogue
) -> None:
    connection_id = await connected(rogue, edge)
    first, queued = spawn(), spawn(queue=True)
    assert (await send(rogue, edge, "agent.spawn", first)).status_code == 200
    await wait_state(edge, first["agentId"], {"running"})
    response = await send(rogue, edge, "agent.spawn", spawn())
    assert response.status_code == 429, response.text
    assert response.json()["code"] == "grant_concurrency"
    assert (await send(rogue, edge, "agent.spawn", queued)).status_code == 200
    response = await send(rogue, edge, "agent.spawn", spawn(queue=True))
    assert response.status_code == 429, response.text
    assert response.json()["code"] == "queue_full"

    response = await edge.call("POST", f"/connections/{connection_id}/suspend")
    assert response.status_code == 200, response.text
    assert await wait_state(edge, first["agentId"], {"killed"}) == "killed"
    # A queued run ends too: killed, or refused at the start of its try (failed).
    assert await wait_state(edge, queued["agentId"], {"killed", "failed"}) in {"killed", "failed"}
    await edge.call("POST", f"/connections/{connection_id}/disconnect")


async def test_a_peer_that_disconnects_has_its_runs_killed(edge: Instance, rogue: Rogue) -> None:
    connection_id = await connected(rogue, edge)
    run = spawn()
    assert (await send(rogue, edge, "agent.spawn", run)).status_code == 200
    await wait_state(edge, run["agentId"], {"running"})
    bye = rogue.envelope(
        "CONNECT", edge.id, {"connectionId": connection_id}, command_type="connection.disconnect"
    )
    assert (await rogue.post(edge.url, "connect", bye)).status_code == 200
    assert await wait_state(edge, run["agentId"], {"killed"}) == "killed"


async def test_a_new_connection_reusing_a_peer_id_inherits_none_of_its_runs(
    edge: Instance, make_rogue: RogueFactory
) -> None:
    rogue = await make_rogue()
    first = await connected(rogue, edge)
    run = spawn("$ true")
    assert (await send(rogue, edge, "agent.spawn", run)).status_code == 200
    await wait_state(edge, run["agentId"], {"completed", "failed"})
    await edge.call("POST", f"/connections/{first}/disconnect")

    # Someone else now answers for the same instanceId: a new key, a new connection.
    heir = await make_rogue(instance_id=rogue.instance_id)
    second = await connected(heir, edge)
    try:
        response = await send(heir, edge, "agent.status", {"agentId": run["agentId"]})
        assert response.status_code == 404, response.text
        response = await send(heir, edge, "agent.spawn", spawn("$ true", agent_id=run["agentId"]))
        assert response.status_code == 409, response.text
        assert response.json()["code"] == "agent_id_conflict"
    finally:
        await edge.call("POST", f"/connections/{second}/disconnect")


async def test_an_agent_id_that_is_not_a_canonical_uuid_is_refused(
    edge: Instance, rogue: Rogue
) -> None:
    connection_id = await connected(rogue, edge)
    try:
        shouting = str(uuid.uuid4()).upper()
        response = await send(rogue, edge, "agent.spawn", spawn("$ true", agent_id=shouting))
        assert response.status_code == 422, response.text
        assert response.json()["code"] == "payload_invalid"
        bare = uuid.uuid4().hex
        response = await send(rogue, edge, "agent.status", {"agentId": bare})
        assert response.status_code == 422, response.text
        assert (
            await edge.fetch("SELECT 1 FROM agents WHERE agent_id = $1", uuid.UUID(shouting)) == []
        )
    finally:
        await edge.call("POST", f"/connections/{connection_id}/disconnect")


async def test_a_queued_run_whose_grant_was_withdrawn_never_starts(
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
        response = await far.call(
            "PATCH",
            f"/connections/{connection_id}",
            json={"grants": {"commandTypes": ["agent.status", "agent.kill"]}},
        )
        assert response.status_code == 200, response.text
        killed = await send(rogue, far, "agent.kill", {"agentId": first["agentId"]})
        assert killed.status_code == 200, killed.text
        assert await wait_state(far, queued["agentId"], {"failed", "completed"}) == "failed"
        rows = await far.fetch(
            "SELECT started_at, error FROM agents WHERE agent_id = $1",
            uuid.UUID(queued["agentId"]),
        )
        assert "granted" in (rows[0]["error"] or ""), rows
    finally:
        await far.call("POST", f"/connections/{connection_id}/disconnect")


async def test_workspaces_of_a_peer_are_private(edge: Instance, rogue: Rogue) -> None:
    connection_id = await connected(rogue, edge)
    try:
        run = spawn("$ true")
        assert (await send(rogue, edge, "agent.spawn", run)).status_code == 200
        await wait_state(edge, run["agentId"], {"completed", "failed"})
        root = Path(edge.info["dataDir"]) / "workspaces" / "edge"
        for directory in (root, root / rogue.instance_id):
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    finally:
        await edge.call("POST", f"/connections/{connection_id}/disconnect")


async def test_a_new_connection_reusing_a_peer_id_cannot_read_the_old_runs_artifacts(
    edge: Instance, make_rogue: RogueFactory
) -> None:
    rogue = await make_rogue()
    first = await connected(rogue, edge)
    run = spawn("$ echo what-the-first-peer-ran")
    assert (await send(rogue, edge, "agent.spawn", run)).status_code == 200
    await wait_state(edge, run["agentId"], {"completed", "failed"})
    ask = {"agentId": run["agentId"], "kind": "log"}
    own = await send(rogue, edge, "agent.artifact", ask)
    assert own.status_code == 200, own.text
    await edge.call("POST", f"/connections/{first}/disconnect")

    heir = await make_rogue(instance_id=rogue.instance_id)
    second = await connected(heir, edge)
    try:
        response = await send(heir, edge, "agent.artifact", ask)
        assert response.status_code == 404, response.text
        assert "data" not in response.json()
    finally:
        await edge.call("POST", f"/connections/{second}/disconnect")


async def test_a_new_connection_reusing_a_peer_id_cannot_report_on_runs_asked_of_the_old_one(
    edge: Instance, make_rogue: RogueFactory
) -> None:
    rogue = await make_rogue()
    first = await connected(rogue, edge, grants={"commandTypes": ["agent.status"]})
    # A run edge asked of the first peer, still running when that connection ended (written
    # as the spawn writes it: the rogue cannot run edge's spawns).
    agent_id = uuid.uuid4()
    await edge.fetch(
        "INSERT INTO agents (agent_id, role, connection_id, peer_instance_id, workspace,"
        " task_id, agent_type, context, options, workflow_id, state)"
        " VALUES ($1, 'requester', $2, $3, 'default', 't-hostile', 'worker', '{}', '{}', $4,"
        " 'running')",
        agent_id,
        uuid.UUID(first),
        rogue.instance_id,
        f"remote-agent/{agent_id}",
    )
    await edge.call("POST", f"/connections/{first}/disconnect")

    heir = await make_rogue(instance_id=rogue.instance_id)
    second = await connected(heir, edge, grants={"commandTypes": ["agent.status"]})
    try:
        report = {
            "agentId": str(agent_id),
            "seq": 5,
            "state": "completed",
            "result": {"summary": "forged by the heir"},
        }
        event = heir.envelope("EVENT", edge.id, report, command_type="agent.state")
        response = await heir.post(edge.url, "event", event)
        assert response.status_code == 404, response.text
        rows = await edge.fetch("SELECT state, result FROM agents WHERE agent_id = $1", agent_id)
        assert rows[0]["state"] == "running" and rows[0]["result"] is None
    finally:
        await edge.call("POST", f"/connections/{second}/disconnect")


async def test_artifact_and_transcript_asks_with_a_non_canonical_agent_id_are_refused(
    edge: Instance, rogue: Rogue
) -> None:
    connection_id = await connected(rogue, edge)
    try:
        run = spawn("$ true")
        assert (await send(rogue, edge, "agent.spawn", run)).status_code == 200
        await wait_state(edge, run["agentId"], {"completed", "failed"})
        shouting = run["agentId"].upper()
        for command, payload in (
            ("agent.artifact", {"agentId": shouting, "kind": "log"}),
            ("agent.transcript", {"agentId": shouting}),
        ):
            response = await send(rogue, edge, command, payload)
            assert response.status_code == 422, (command, response.text)
            assert response.json()["code"] == "payload_invalid"
    finally:
        await edge.call("POST", f"/connections/{connection_id}/disconnect")
