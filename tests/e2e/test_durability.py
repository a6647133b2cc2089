"""Durable orchestration, proven by breaking real processes: workers killed, requester or
executor down, lost and repeated events, timeouts, retries, capacity, and what operators see."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from cli.devstack import DevStack
from federation.envelope import MessageType, sign_envelope
from tests.conftest import Instance, ensure_connection
from tests.e2e.helpers import processes_in, spawn_body
from tests.e2e.proxy import ControlledProxy
from tests.e2e.signing import instance_key

pytestmark = pytest.mark.e2e


def workspace(stack: DevStack, executor: Instance, requester: Instance, agent_id: str) -> Path:
    return stack.data_dir / "workspaces" / executor.name / requester.id / agent_id


async def wait_for(predicate: Any, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def executor_state(executor: Instance, agent_id: str) -> str | None:
    rows = await executor.fetch(
        "SELECT state FROM agents WHERE role = 'executor' AND agent_id = $1", uuid.UUID(agent_id)
    )
    return rows[0]["state"] if rows else None


async def test_executor_worker_killed_mid_run_completes_once(
    hub: Instance, spoke: Instance, hub_spoke: str, stack: DevStack
) -> None:
    body = spawn_body(
        hub_spoke, "$ echo a >> log.txt\n$ sleep 4\n$ echo b >> log.txt", task_id="crash-1"
    )
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    ws = workspace(stack, spoke, hub, body["agentId"])

    async def sleeping() -> bool:
        agent = (await hub.call("GET", f"/agents/{body['agentId']}")).json()
        return (agent.get("progress") or {}).get("command") == "sleep 4" and bool(processes_in(ws))

    await wait_for(sleeping, what="the agent's sleep")
    stack.stop_workers("spoke", signal.SIGKILL)
    await wait_for(lambda: _async(not processes_in(ws)), 5, "the sandbox to die with its worker")
    stack.start_worker("spoke")

    agent = await hub.wait_agent(body["agentId"], timeout=90)
    assert agent["state"] == "completed", agent
    # Resumed after the last heartbeat: the finished echo did not run again.
    assert (ws / "log.txt").read_text() == "a\nb\n"
    assert agent["attempt"] == 1
    assert await spoke.count_workflows(f"AgentId = '{body['agentId']}'") == 1


async def _async(value: bool) -> bool:
    return value


async def test_requester_down_while_agent_runs_still_ends_right(
    hub: Instance, spoke: Instance, hub_spoke: str, stack: DevStack
) -> None:
    body = spawn_body(hub_spoke, "$ sleep 3\n$ echo finished", task_id="requester-down")
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    await hub.wait_agent(body["agentId"], {"running"})

    stack.stop_api("hub")
    stack.stop_workers("hub")
    await wait_for(
        lambda: _is(executor_state(spoke, body["agentId"]), "completed"),
        what="the run to end on spoke",
    )
    stack.start_api("hub")
    stack.start_worker("hub")
    await stack.wait_ready("hub")

    agent = await hub.wait_agent(body["agentId"], timeout=60)
    assert agent["state"] == "completed"
    assert agent["result"]["exitCodes"] == [0, 0]
    assert "finished" in agent["result"]["logTail"]


async def _is(value: Any, expected: Any) -> bool:
    return (await value) == expected


async def test_executor_down_at_spawn_gets_it_once_when_back(
    hub: Instance, spoke: Instance, hub_spoke: str, stack: DevStack
) -> None:
    stack.stop_api("spoke")
    stack.stop_workers("spoke")
    try:
        body = spawn_body(hub_spoke, "$ echo ran >> runs.txt", task_id="executor-down")
        response = await hub.call("POST", "/agents/spawn", json=body)
        assert response.status_code == 202
        await asyncio.sleep(20)
        agent = (await hub.call("GET", f"/agents/{body['agentId']}")).json()
        assert agent["state"] == "spawning"
    finally:
        stack.start_api("spoke")
        stack.start_worker("spoke")
        await stack.wait_ready("spoke")

    agent = await hub.wait_agent(body["agentId"], timeout=60)
    assert agent["state"] == "completed", agent
    ws = workspace(stack, spoke, hub, body["agentId"])
    assert (ws / "runs.txt").read_text() == "ran\n"
    assert await spoke.count_workflows(f"AgentId = '{body['agentId']}'") == 1


async def test_a_run_over_its_timeout_ends_timed_out(
    hub: Instance, spoke: Instance, hub_spoke: str, stack: DevStack
) -> None:
    body = spawn_body(hub_spoke, "$ sleep 60", task_id="timeout-1", timeout=2, max_retries=2)
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    agent = await hub.wait_agent(body["agentId"], timeout=30)
    assert agent["state"] == "timed_out"
    assert "timeout" in agent["error"]
    assert agent["attempt"] == 1  # a timeout is not retried
    assert processes_in(workspace(stack, spoke, hub, body["agentId"])) == []


async def test_a_failed_try_is_retried_and_the_attempt_shows(hub: Instance, hub_spoke: str) -> None:
    flaky = "$ test -f tried || { touch tried; exit 1; }\n$ echo second try"
    retried = spawn_body(hub_spoke, flaky, task_id="retry-1", max_retries=1)
    once = spawn_body(hub_spoke, flaky, task_id="retry-0", max_retries=0)
    for body in (retried, once):
        assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    agent = await hub.wait_agent(retried["agentId"], timeout=60)
    assert (agent["state"], agent["attempt"]) == ("completed", 2)
    assert "second try" in agent["result"]["logTail"]
    agent = await hub.wait_agent(once["agentId"], timeout=60)
    assert (agent["state"], agent["attempt"]) == ("failed", 1)


async def test_repeated_and_stale_events_do_not_change_the_outcome(
    hub: Instance, spoke: Instance, hub_spoke: str
) -> None:
    body = spawn_body(hub_spoke, "$ echo done", task_id="events-1")
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    final = await hub.wait_agent(body["agentId"])
    assert final["state"] == "completed"
    rows = await spoke.fetch(
        "SELECT seq FROM agents WHERE role = 'executor' AND agent_id = $1",
        uuid.UUID(body["agentId"]),
    )
    last_seq = rows[0]["seq"]
    key = await instance_key(spoke)

    async def send(seq: int, state: str) -> dict[str, Any]:
        envelope = sign_envelope(
            key,
            type=MessageType.EVENT,
            sender_id=spoke.id,
            recipient_id=hub.id,
            command_type="agent.state",
            payload={"agentId": body["agentId"], "seq": seq, "state": state},
        )
        response = await hub.http.post(
            f"{hub.url}/api/v1/federation/incoming/event", json=envelope.to_wire()
        )
        assert response.status_code == 200, response.text
        payload: dict[str, Any] = response.json()["payload"]
        return payload

    assert (await send(last_seq, "completed"))["applied"] is False  # delivered twice
    assert (await send(1, "running"))["applied"] is False  # late and out of order
    assert (await send(last_seq + 5, "failed"))["applied"] is False  # after the final state
    agent = (await hub.call("GET", f"/agents/{body['agentId']}")).json()
    assert (agent["state"], agent["result"]) == ("completed", final["result"])


async def test_with_events_blocked_polling_brings_the_final_state(
    far: Instance, spoke: Instance, far_proxy: ControlledProxy
) -> None:
    connection_id = await ensure_connection(far, spoke)
    far_proxy.rules.refuse_paths = {"/incoming/event"}
    try:
        body = spawn_body(connection_id, "$ echo through polling", task_id="poll-1")
        assert (await far.call("POST", "/agents/spawn", json=body)).status_code == 202
        agent = await far.wait_agent(body["agentId"], timeout=60)
    finally:
        far_proxy.rules.refuse_paths = set()
    assert agent["state"] == "completed"
    assert "through polling" in agent["result"]["logTail"]
    assert any("/incoming/event" in r for r in far_proxy.refused), "no event was blocked"


async def test_executor_capacity_refuses_with_429_or_queues_on_request(
    spoke: Instance, far: Instance, stack: DevStack
) -> None:
    connection_id = await ensure_connection(spoke, far)  # far runs at most one agent at a time
    key = await instance_key(spoke)

    def spawn_command(instructions: str, queue: bool) -> dict[str, Any]:
        payload = spawn_body(connection_id, instructions, task_id="cap")
        payload.pop("connectionId")
        payload["options"]["queue"] = queue
        return sign_envelope(
            key,
            type=MessageType.COMMAND,
            sender_id=spoke.id,
            recipient_id=far.id,
            command_type="agent.spawn",
            payload=payload,
        ).to_wire()

    async def post(envelope: dict[str, Any]) -> Any:
        return await far.http.post(f"{far.url}/api/v1/federation/incoming/command", json=envelope)

    busy = await spoke.call(
        "POST", "/agents/spawn", json=spawn_body(connection_id, "$ sleep 4", task_id="cap-busy")
    )
    assert busy.status_code == 202
    await wait_for(
        lambda: _is(executor_state(far, busy.json()["agentId"]), "running"), what="first agent"
    )

    over = spawn_command("$ echo over", queue=False)
    refused = await post(over)
    assert (refused.status_code, refused.json()["code"]) == (429, "capacity_exceeded")
    assert await far.count_workflows(f"AgentId = '{over['payload']['agentId']}'") == 0

    queued = spawn_command("$ echo queued", queue=True)
    accepted = await post(queued)
    assert accepted.status_code == 200, accepted.text
    await wait_for(
        lambda: _is(executor_state(far, queued["payload"]["agentId"]), "completed"),
        what="the queued agent",
    )
    rows = await far.fetch(
        "SELECT agent_id, state, started_at, finished_at FROM agents WHERE role = 'executor'"
        " AND agent_id = ANY($1::uuid[])",
        [uuid.UUID(busy.json()["agentId"]), uuid.UUID(queued["payload"]["agentId"])],
    )
    by_id = {str(r["agent_id"]): r for r in rows}
    first, second = by_id[busy.json()["agentId"]], by_id[queued["payload"]["agentId"]]
    assert first["state"] == "completed"
    # It waited for the slot: it started only once the first one's `sleep 4` was over.
    assert (second["started_at"] - first["started_at"]).total_seconds() >= 3.5


async def test_workflows_carry_search_attributes_summary_and_status(
    hub: Instance, spoke: Instance, hub_spoke: str
) -> None:
    body = spawn_body(hub_spoke, "$ echo visible", task_id="ui-1", agent_type="tester")
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    await hub.wait_agent(body["agentId"])
    agent_id = body["agentId"]
    workflow_ids = {
        "hub": f"remote-agent/{agent_id}",
        "spoke": f"agent-run/{hub.id}/{agent_id}",
    }
    for instance, peer, word in ((hub, "spoke", "on"), (spoke, "hub", "from")):
        client = await instance.temporal()
        await client.get_workflow_handle(workflow_ids[instance.name]).result()
        # Visibility is eventually consistent: give it a moment after the close.
        for _ in range(50):
            found = [w async for w in client.list_workflows(f"AgentId = '{agent_id}'")]
            if found and dict(found[0].search_attributes.items()).get("AgentState") == [
                "completed"
            ]:
                break
            await asyncio.sleep(0.2)
        assert len(found) == 1
        assert found[0].id == workflow_ids[instance.name]
        attrs = dict(found[0].search_attributes.items())
        assert attrs["TaskId"] == ["ui-1"]
        assert attrs["AgentType"] == ["tester"]
        assert attrs["PeerInstance"] == [peer]
        assert attrs["AgentState"] == ["completed"]
        described = await client.get_workflow_handle(found[0].id).describe()
        assert await described.static_summary() == f"tester agent for task ui-1 {word} {peer}"
        status = await client.get_workflow_handle(found[0].id).query("status")
        assert status["state"] == "completed"
    hits = await hub.count_workflows(
        "AgentState = 'completed' AND TaskId = 'ui-1' AND PeerInstance = 'spoke'"
    )
    assert hits == 1


async def test_events_stream_follows_the_agent_and_resumes(hub: Instance, hub_spoke: str) -> None:
    body = spawn_body(hub_spoke, "$ echo a\n$ sleep 1.5\n$ echo b", task_id="sse-1")
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202

    async def read(headers: dict[str, str]) -> list[tuple[int, str, dict[str, Any]]]:
        events: list[tuple[int, str, dict[str, Any]]] = []
        async with hub.http.stream(
            "GET",
            f"{hub.url}/api/v1/federation/agents/{body['agentId']}/events",
            headers={**hub.auth, **headers},
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            fields: dict[str, str] = {}
            async for line in response.aiter_lines():
                if line == "" and "data" in fields:
                    events.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
                    fields = {}
                elif ":" in line and not line.startswith(":"):
                    name, _, value = line.partition(":")
                    fields[name] = value.strip()
        return events

    events = await read({})
    # The agent's transcript travels in the same stream (event: transcript).
    states = [data["state"] for _, kind, data in events if kind != "transcript"]
    assert states[0] == "spawning" and states[-1] == "completed"
    assert "running" in states
    assert events[-1][1] == "state"
    # every change of state is an `event: state`, news within a state `progress`
    changes = [data["state"] for _, kind, data in events if kind == "state"]
    assert changes[:2] == ["spawning", "running"] and changes[-1] == "completed"
    assert len(changes) == len(set(changes))
    ids = [event_id for event_id, _, _ in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    resumed = await read({"Last-Event-ID": str(ids[1])})

    def key(event: tuple[int, str, dict[str, Any]]) -> tuple[str, int]:
        event_id, kind, data = event
        return ("entry", int(data["seq"])) if kind == "transcript" else ("log", event_id >> 20)

    # Resumed after ids[1]: exactly what came after it, none twice, in increasing ids. (Where
    # transcript entries fall among progress events may differ: live, an entry is sent when it
    # arrives; resumed, by when it happened.)
    resumed_ids = [event_id for event_id, _, _ in resumed]
    assert resumed_ids == sorted(set(resumed_ids)) and resumed_ids[0] > ids[1]
    assert sorted(map(key, resumed)) == sorted(map(key, events[2:]))
    assert len({key(e) for e in resumed}) == len(resumed)

    listed = await hub.call("GET", "/agents", params={"taskId": "sse-1", "state": "completed"})
    assert [a["agentId"] for a in listed.json()] == [body["agentId"]]
    none = await hub.call("GET", "/agents", params={"taskId": "sse-1", "agentType": "reviewer"})
    assert none.json() == []


async def test_sigterm_lets_a_running_agent_finish_then_the_worker_exits(
    hub: Instance, spoke: Instance, hub_spoke: str, stack: DevStack
) -> None:
    body = spawn_body(hub_spoke, "$ sleep 3\n$ echo ran >> runs.txt", task_id="sigterm-1")
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    await hub.wait_agent(body["agentId"], {"running"})
    stack.start_worker("spoke")  # the replacement, polling alongside
    old = stack.instances["spoke"].workers[0]
    old.send_signal(signal.SIGTERM)
    exit_code = await asyncio.to_thread(old.wait, 40)
    assert exit_code == 0
    agent = await hub.wait_agent(body["agentId"], timeout=60)
    assert (agent["state"], agent["attempt"]) == ("completed", 1)
    ws = workspace(stack, spoke, hub, body["agentId"])
    assert (ws / "runs.txt").read_text() == "ran\n"
    stack.instances["spoke"].workers.remove(old)


async def test_the_callers_trace_travels_in_the_signed_envelope_to_the_executor(
    hub: Instance, spoke: Instance, hub_spoke: str, stack: DevStack
) -> None:
    trace_id = uuid.uuid4().hex
    body = spawn_body(hub_spoke, "$ echo traced", task_id="trace-1")
    response = await hub.call(
        "POST",
        "/agents/spawn",
        json=body,
        headers={"traceparent": f"00-{trace_id}-{'1' * 16}-01"},
    )
    assert response.status_code == 202
    assert (await hub.wait_agent(body["agentId"]))["state"] == "completed"

    rows = await hub.fetch(
        "SELECT traceparent FROM agents WHERE agent_id = $1", uuid.UUID(body["agentId"])
    )
    assert rows[0]["traceparent"].split("-")[1] == trace_id
    # The executor's workflow input is the signed spawn as received: the trace is inside it.
    client = await spoke.temporal()
    handle = client.get_workflow_handle(f"agent-run/{hub.id}/{body['agentId']}")
    history = await handle.fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    envelope = json.loads(started.input.payloads[0].data)["envelope"]
    assert envelope["traceparent"].split("-")[1] == trace_id
    assert envelope["traceparent"] != f"00-{trace_id}-{'1' * 16}-01"  # a span of its own
    # And the executor's worker logs the run under the same trace id.
    worker_logs = "".join(p.read_text() for p in stack.logs.glob("spoke-worker*.log"))
    assert f"traceId={trace_id}" in worker_logs
