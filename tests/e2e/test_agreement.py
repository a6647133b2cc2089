"""Both sides of a run agree on how it ended: a connection suspended or disconnected by either
side, a kill the executor could not hear at once, a requester's workflow terminated (issue 20,
points 1-3). Each test reads both sides' REST views and both workflows' own final status."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from typing import Any

import httpx
import pytest

from cli.devstack import DevStack
from federation.envelope import MessageType, sign_envelope
from tests.conftest import Instance, connect, ensure_connection
from tests.e2e.helpers import hosted, hosted_state, spawn_body, workflow_state
from tests.e2e.proxy import ControlledProxy
from tests.e2e.signing import assert_refused, craft, instance_key, post_command, spawn_payload

pytestmark = pytest.mark.e2e


async def both_ended(
    requester: Instance, executor: Instance, agent_id: str, timeout: float = 60.0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both REST views once both are final; both workflows closed saying the same."""
    mine = await requester.wait_agent(agent_id, timeout=timeout)
    await hosted_state(executor, agent_id, {"completed", "failed", "killed", "timed_out"}, timeout)
    theirs = await hosted(executor, agent_id)
    assert await workflow_state(requester, f"remote-agent/{agent_id}") == mine["state"]
    run_id = f"agent-run/{requester.id}/{agent_id}"
    assert await workflow_state(executor, run_id) == theirs["state"]
    return mine, theirs


async def running_on(requester: Instance, connection_id: str, task_id: str) -> str:
    body = spawn_body(connection_id, "$ sleep 300", task_id=task_id, timeout=600)
    response = await requester.call("POST", "/agents/spawn", json=body)
    assert response.status_code == 202, response.text
    await requester.wait_agent(body["agentId"], {"running"}, timeout=60)
    return str(body["agentId"])


async def through_the_proxy(hub: Instance, far: Instance) -> str:
    """An ACTIVE connection over which hub reaches far through the proxy: far asks for it (its
    request carries its public URL, the proxy's) and grants hub every command."""
    listed = (await hub.call("GET", "/connections")).json()
    if not any(c["remoteInstanceId"] == far.id and c["status"] == "ACTIVE" for c in listed):
        await connect(far, hub)
    return await ensure_connection(hub, far)


async def disconnect_both(one: Instance, other: Instance, connection_id: str) -> None:
    for side in (one, other):
        await side.call("POST", f"/connections/{connection_id}/disconnect")


@pytest.mark.parametrize(
    ("who", "change"),
    [
        ("executor", "suspend"),
        ("requester", "suspend"),
        ("executor", "disconnect"),
        ("requester", "disconnect"),
    ],
)
async def test_a_connection_ended_by_either_side_ends_its_runs_alike_on_both(
    hub: Instance, edge: Instance, who: str, change: str
) -> None:
    connection_id = await connect(hub, edge)
    try:
        agent_id = await running_on(hub, connection_id, f"end-{who}-{change}")
        actor = edge if who == "executor" else hub
        response = await actor.call("POST", f"/connections/{connection_id}/{change}")
        assert response.status_code == 200, response.text
        mine, theirs = await both_ended(hub, edge, agent_id, timeout=60)
        assert (mine["state"], theirs["state"]) == ("killed", "killed"), (mine, theirs)
        # Killed by the end of the connection, on either side (whichever told the run first).
        assert mine["error"] and theirs["error"], (mine, theirs)
    finally:
        await disconnect_both(hub, edge, connection_id)


async def test_a_kill_the_executor_could_not_hear_is_delivered_once_it_is_back(
    hub: Instance, far: Instance, far_proxy: ControlledProxy
) -> None:
    connection_id = await through_the_proxy(hub, far)
    agent_id = await running_on(hub, connection_id, "kill-unreachable")
    try:
        await hosted_state(far, agent_id, {"running"}, 30)
        far_proxy.rules.down = True
        try:
            response = await hub.call("POST", f"/agents/{agent_id}/kill")
            assert response.status_code == 200, response.text
            answer = response.json()
            assert answer["state"] == "killed", answer
            await asyncio.sleep(3)
            assert (await hosted(far, agent_id))["state"] == "running"
        finally:
            far_proxy.rules.down = False
        # Delivered with backoff once the executor is back: it stops the run and says so.
        assert await hosted_state(far, agent_id, {"killed", "completed"}, 60) == "killed"
        mine, theirs = await both_ended(hub, far, agent_id)
        assert (mine["state"], theirs["state"]) == ("killed", "killed")
        assert answer.get("confirmed") is False, answer  # the answer said it was not confirmed
        assert await kill_confirmed(hub, agent_id, 30)
    finally:
        await free(far, agent_id)


async def free(executor: Instance, agent_id: str) -> None:
    """Whatever a test found, its run does not hold the executor's slots after it."""
    await executor.call("POST", f"/hosted/{agent_id}/kill")


async def kill_confirmed(requester: Instance, agent_id: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        agent = (await requester.call("GET", f"/agents/{agent_id}")).json()
        if agent.get("killConfirmed") or time.monotonic() > deadline:
            return bool(agent.get("killConfirmed"))
        await asyncio.sleep(0.2)


async def test_a_terminated_requester_workflow_has_its_run_killed_on_the_executor(
    hub: Instance, far: Instance
) -> None:
    connection_id = await through_the_proxy(hub, far)
    agent_id = await running_on(hub, connection_id, "terminated-requester")
    try:
        await hosted_state(far, agent_id, {"running"}, 30)
        client = await hub.temporal()
        await client.get_workflow_handle(f"remote-agent/{agent_id}").terminate("test")
        # The reconciler writes `killed` here (within two of its passes), tells the executor.
        mine = await hub.wait_agent(agent_id, timeout=120)
        assert mine["state"] == "killed", mine
        assert await hosted_state(far, agent_id, {"killed", "completed"}, 60) == "killed"
        theirs = await hosted(far, agent_id)
        assert theirs["state"] == "killed"
        assert await workflow_state(far, f"agent-run/{hub.id}/{agent_id}") == "killed"
    finally:
        await free(far, agent_id)


async def test_the_kills_of_an_ended_connection_are_done_after_the_api_that_began_them_died(
    hub: Instance, far: Instance, far_proxy: ControlledProxy, stack: DevStack
) -> None:
    connection_id = await through_the_proxy(hub, far)
    workers = len(stack.instances["far"].workers)
    try:
        agent_id = await running_on(hub, connection_id, "end-durable")
        await hosted_state(far, agent_id, {"running"}, 30)
        # No worker of the executor can stop the run while its admin suspends the connection,
        # the API process that took the suspension dies right after, and the requester's kill
        # cannot reach the executor. The suspension answers at once all the same (the kills
        # are a workflow's), and the executor's workers end the run once they are back.
        far_proxy.rules.down = True
        stack.stop_workers("far", signal.SIGKILL)
        response = await far.call("POST", f"/connections/{connection_id}/suspend", timeout=10)
        assert response.status_code == 200, response.text
        stack.stop_api("far")
        for _ in range(workers):
            stack.start_worker("far")
        ended = await run_state(far, hub, agent_id, {"killed", "failed"}, 90)
        # Killed by the workflow (its try's worker gone, the kill ends with the heartbeat
        # timeout), or refused at the restart of its try (the connection is SUSPENDED there):
        # either way the executor's end of the connection killed it.
        assert ended == "killed", ended
        assert await ends_done(far, connection_id, 60)
    finally:
        far_proxy.rules.down = False
        if stack.instances["far"].api is None:
            stack.start_api("far")
        while len(stack.instances["far"].workers) < workers:
            stack.start_worker("far")
        await stack.wait_ready("far")
    try:
        mine, theirs = await both_ended(hub, far, agent_id, timeout=60)
        assert (mine["state"], theirs["state"]) == ("killed", "killed"), (mine, theirs)
    finally:
        await disconnect_both(hub, far, connection_id)


async def ends_done(executor: Instance, connection_id: str, timeout: float) -> bool:
    """The executor's EndConnectionRunsWorkflow of this connection has completed."""
    client = await executor.temporal()
    query = "WorkflowType = 'EndConnectionRunsWorkflow' AND ExecutionStatus = 'Completed'"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async for found in client.list_workflows(query):
            if found.id.startswith(f"end-runs/{connection_id}/"):
                return True
        await asyncio.sleep(0.5)
    return False


async def run_state(
    executor: Instance, requester: Instance, agent_id: str, states: set[str], timeout: float
) -> str | None:
    """The executor's state of a run, read from its store (its API may be down)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await executor.fetch(
            "SELECT state FROM agents WHERE role = 'executor' AND agent_id = $1"
            " AND peer_instance_id = $2",
            uuid.UUID(agent_id),
            requester.id,
        )
        state = rows[0]["state"] if rows else None
        if state in states or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.2)


async def test_an_ended_connection_carries_only_what_ends_the_runs_it_had(
    hub: Instance, edge: Instance
) -> None:
    connection_id = await connect(hub, edge)
    try:
        agent_id = await running_on(hub, connection_id, "ended-carries-little")
        response = await edge.call("POST", f"/connections/{connection_id}/suspend")
        assert response.status_code == 200, response.text
        await both_ended(hub, edge, agent_id)
        edge_key, hub_key = await instance_key(edge), await instance_key(hub)

        async def event(state: str, about: str) -> httpx.Response:
            payload = {"agentId": about, "seq": 1000, "state": state}
            envelope = sign_envelope(
                edge_key,
                type=MessageType.EVENT,
                sender_id=edge.id,
                recipient_id=hub.id,
                command_type="agent.state",
                payload=payload,
            ).to_wire()
            return await hub.http.post(f"{hub.url}/api/v1/federation/incoming/event", json=envelope)

        # Only a final state, and only of a run the connection had.
        refused = await event("running", agent_id)
        assert (refused.status_code, refused.json()["code"]) == (403, "connection_not_active")
        refused = await event("completed", str(uuid.uuid4()))
        assert (refused.status_code, refused.json()["code"]) == (404, "agent_not_found")
        # The executor hears a status ask or a kill of a run the connection had, nothing else.
        spawn = craft(hub_key, hub, edge, spawn_payload())
        await assert_refused(edge, spawn, 403, "connection_not_active")
        unknown = craft(
            hub_key, hub, edge, {"agentId": str(uuid.uuid4())}, command_type="agent.kill"
        )
        await assert_refused(edge, unknown, 404, "agent_not_found")
        status = craft(hub_key, hub, edge, {"agentId": agent_id}, command_type="agent.status")
        answered = await post_command(edge, status)
        assert answered.status_code == 200, answered.text
        assert answered.json()["payload"]["state"] == "killed"
        assert (await hub.wait_agent(agent_id))["state"] == "killed"
    finally:
        await disconnect_both(hub, edge, connection_id)


async def test_a_requester_away_when_the_executor_suspended_still_hears_how_its_run_ended(
    far: Instance, spoke: Instance, far_proxy: ControlledProxy
) -> None:
    # far asks spoke for the connection: spoke reaches far only through the proxy.
    listed = (await far.call("GET", "/connections")).json()
    if not any(c["remoteInstanceId"] == spoke.id and c["status"] == "ACTIVE" for c in listed):
        await connect(far, spoke)
    connection_id = await ensure_connection(far, spoke)
    try:
        agent_id = await running_on(far, connection_id, "requester-away")
        far_proxy.rules.drop = True  # far looks gone: its requests are cut, retried later
        try:
            response = await spoke.call("POST", f"/connections/{connection_id}/suspend")
            assert response.status_code == 200, response.text
            assert response.json()["peerNotified"] is False
            assert await hosted_state(spoke, agent_id, {"killed"}, 60) == "killed"
        finally:
            far_proxy.rules.drop = False
        # far never heard of the suspension: the executor's final event (retried) still goes,
        # and far's status asks of the run are still answered.
        mine, theirs = await both_ended(far, spoke, agent_id, timeout=90)
        assert (mine["state"], theirs["state"]) == ("killed", "killed"), (mine, theirs)
        assert await final_event_sent(spoke, agent_id, 60)
    finally:
        await disconnect_both(far, spoke, connection_id)


async def final_event_sent(executor: Instance, agent_id: str, timeout: float) -> bool:
    """The executor sent the requester a signed event of the run's final state."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await executor.fetch(
            "SELECT 1 FROM messages WHERE direction = 'out' AND type = 'EVENT'"
            " AND agent_id = $1 AND payload->>'state' = 'killed'",
            uuid.UUID(agent_id),
        )
        if rows or time.monotonic() > deadline:
            return bool(rows)
        await asyncio.sleep(0.5)


async def test_a_spawn_delivered_twice_by_a_balancer_still_runs_once_alike_on_both_sides(
    hub: Instance, far: Instance, far_proxy: ControlledProxy
) -> None:
    """The executor records the spawn's message and its run, but its answer is lost and the
    same signed message arrives again (a balancer's retry on another replica): refused as a
    replay, it must not end the run on the requester while it runs on the executor."""
    connection_id = await through_the_proxy(hub, far)
    body = spawn_body(connection_id, "$ echo once >> once.txt", task_id="delivered-twice")
    far_proxy.rules.repeat_next = "/incoming/command"
    try:
        response = await hub.call("POST", "/agents/spawn", json=body)
        assert response.status_code == 202, response.text
        mine, theirs = await both_ended(hub, far, body["agentId"])
    finally:
        far_proxy.rules.repeat_next = None
    assert far_proxy.repeated, "the spawn was not delivered twice"
    assert (mine["state"], theirs["state"]) == ("completed", "completed"), (mine, theirs)
    assert [c["command"] for c in theirs["result"]["commands"]] == ["echo once >> once.txt"]
