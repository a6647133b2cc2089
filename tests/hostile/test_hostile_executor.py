"""An executor cannot fill the requester or break its reads (issue 18, point 10).

The rogue is the executor of a run `hub` asked of it (the run's row is written as a spawn
writes it: the rogue cannot run hub's spawns), and speaks only the wire contract: signed
`agent.transcript` and `agent.state` EVENTs, and signed answers to hub's `agent.transcript`
pulls."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import Instance
from tests.hostile.conftest import connected
from tests.hostile.rogue import Rogue, now_rfc3339

# FEDAGENT_TRANSCRIPT_LIMIT and FEDAGENT_TRANSCRIPT_MAX_ENTRIES as the stack leaves them.
BYTE_LIMIT = 2 * 1024 * 1024
ENTRY_CAP = 20_000


def entry(seq: int, text: str = "thinking", **fields: Any) -> dict[str, Any]:
    return {
        "seq": seq,
        "attempt": 1,
        "at": now_rfc3339(),
        "kind": "assistant",
        "turn": 1,
        "text": text,
        **fields,
    }


async def requested_run(hub: Instance, rogue: Rogue, connection_id: str) -> uuid.UUID:
    """A running agent hub spawned on the rogue."""
    agent_id = uuid.uuid4()
    await hub.fetch(
        "INSERT INTO agents (agent_id, role, connection_id, peer_instance_id, workspace,"
        " task_id, agent_type, context, options, workflow_id, state)"
        " VALUES ($1, 'requester', $2, $3, 'default', 't-hostile', 'worker', '{}', '{}', $4,"
        " 'running')",
        agent_id,
        uuid.UUID(connection_id),
        rogue.instance_id,
        f"remote-agent/{agent_id}",
    )
    return agent_id


async def send_entries(
    rogue: Rogue, hub: Instance, agent_id: uuid.UUID, entries: list[Any], total: int = 0
) -> httpx.Response:
    payload = {"agentId": str(agent_id), "entries": entries, "total": total or len(entries)}
    event = rogue.envelope("EVENT", hub.id, payload, command_type="agent.transcript")
    return await rogue.post(hub.url, "event", event)


async def report_final(rogue: Rogue, hub: Instance, agent_id: uuid.UUID, entries: int) -> None:
    report = {
        "agentId": str(agent_id),
        "seq": 5,
        "state": "completed",
        "result": {"summary": "done", "transcript": {"entries": entries, "truncated": False}},
    }
    event = rogue.envelope("EVENT", hub.id, report, command_type="agent.state")
    response = await rogue.post(hub.url, "event", event)
    assert response.status_code == 200, response.text


async def kept(hub: Instance, agent_id: uuid.UUID) -> list[tuple[int, str]]:
    rows = await hub.fetch(
        "SELECT seq, entry->>'kind' AS kind FROM requested_transcript WHERE agent_id = $1"
        " ORDER BY seq",
        agent_id,
    )
    return [(r["seq"], r["kind"]) for r in rows]


async def whole_transcript(hub: Instance, agent_id: uuid.UUID) -> list[dict[str, Any]]:
    """Every entry through the REST pages (`after` = the previous page's `next`)."""
    entries: list[dict[str, Any]] = []
    after = 0
    while True:
        response = await hub.call("GET", f"/agents/{agent_id}/transcript?after={after}&limit=1000")
        assert response.status_code == 200, response.text
        page = response.json()
        if not page["entries"]:
            return entries
        entries += page["entries"]
        after = page["next"]


async def read_stream(hub: Instance, agent_id: uuid.UUID) -> list[tuple[str, dict[str, Any]]]:
    """The agent's event stream to its end, as (event, data) pairs."""
    events: list[tuple[str, dict[str, Any]]] = []
    url = f"{hub.url}/api/v1/federation/agents/{agent_id}/events"
    async with hub.http.stream("GET", url, headers=hub.auth, timeout=60) as response:
        assert response.status_code == 200
        fields: dict[str, str] = {}
        async for line in response.aiter_lines():
            if line == "" and "data" in fields:
                events.append((fields["event"], json.loads(fields["data"])))
                fields = {}
            elif ":" in line and not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.strip()
    return events


@pytest.fixture
async def run(hub: Instance, rogue: Rogue) -> Any:
    connection_id = await connected(rogue, hub)
    yield await requested_run(hub, rogue, connection_id)
    await hub.call("POST", f"/connections/{connection_id}/disconnect")


async def test_a_transcript_past_the_per_run_byte_limit_ends_with_one_truncated_entry(
    hub: Instance, rogue: Rogue, run: uuid.UUID
) -> None:
    big = "x" * 200_000
    for first in (1, 5, 9):
        batch = [entry(seq, big) for seq in range(first, first + 4)]
        response = await send_entries(rogue, hub, run, batch, total=12)
        assert response.status_code == 200, response.text
    stored = await kept(hub, run)
    limit_reached = BYTE_LIMIT // 200_100 + 1
    assert [seq for seq, _ in stored] == list(range(1, limit_reached + 1))
    assert stored[-1][1] == "truncated" and {k for _, k in stored[:-1]} == {"assistant"}
    # Nothing more is kept after it, whatever the executor sends.
    response = await send_entries(rogue, hub, run, [entry(13), entry(14)], total=14)
    assert response.json()["payload"] == {
        "agentId": str(run),
        "stored": limit_reached,
        "full": True,
    }
    assert len(await kept(hub, run)) == limit_reached
    # Read back page by page (a page holds about 1 MiB), all of it, in order.
    entries = await whole_transcript(hub, run)
    assert [e["seq"] for e in entries] == list(range(1, limit_reached + 1))
    page = (await hub.call("GET", f"/agents/{run}/transcript?limit=1000")).json()
    assert page["truncated"] is True and 1 < len(page["entries"]) < limit_reached


async def test_a_transcript_past_the_per_run_entry_cap_ends_with_one_truncated_entry(
    hub: Instance, rogue: Rogue, run: uuid.UUID
) -> None:
    for first in range(1, ENTRY_CAP + 1, 2000):
        batch = [entry(seq, "n", kind="note") for seq in range(first, first + 2000)]
        response = await send_entries(rogue, hub, run, batch, total=ENTRY_CAP + 5)
        assert response.status_code == 200, response.text
    more = [entry(seq) for seq in range(ENTRY_CAP + 1, ENTRY_CAP + 6)]
    response = await send_entries(rogue, hub, run, more, total=ENTRY_CAP + 5)
    assert response.json()["payload"]["full"] is True
    rows = await hub.fetch(
        "SELECT count(*) AS n, max(seq) AS last FROM requested_transcript WHERE agent_id = $1",
        run,
    )
    assert (rows[0]["n"], rows[0]["last"]) == (ENTRY_CAP + 1, ENTRY_CAP + 1)
    assert (await kept(hub, run))[-1] == (ENTRY_CAP + 1, "truncated")


BAD_ENTRIES: list[tuple[str, list[Any]]] = [
    ("seq as a string", [entry(1) | {"seq": "1"}]),
    ("seq zero", [entry(1) | {"seq": 0}]),
    ("seq out of range", [entry(1) | {"seq": 10**12}]),
    ("seq a boolean", [entry(1) | {"seq": True}]),
    ("no kind", [{k: v for k, v in entry(1).items() if k != "kind"}]),
    ("kind with markup", [entry(1, kind="<script>")]),
    ("input not an object", [entry(1, kind="tool_call", input=["rm", "-rf"])]),
    ("text not a string", [entry(1, text={"nested": True})]),
    ("exit code not a number", [entry(1, kind="tool_result", exitCode="0")]),
    ("a time without an offset", [entry(1, at="2024-01-01T00:00:00")]),
    ("an entry over 256 KiB", [entry(1, "y" * 300_000)]),
    ("numbered backwards", [entry(2), entry(1)]),
    ("numbered twice", [entry(1), entry(1)]),
    ("not an object", ["just text"]),
]


@pytest.mark.parametrize(("what", "entries"), BAD_ENTRIES, ids=[w for w, _ in BAD_ENTRIES])
async def test_a_malformed_transcript_entry_is_refused_and_nothing_is_kept(
    hub: Instance, rogue: Rogue, run: uuid.UUID, what: str, entries: list[Any]
) -> None:
    response = await send_entries(rogue, hub, run, entries)
    assert response.status_code == 422, (what, response.text)
    assert response.json()["code"] == "payload_invalid"
    assert await kept(hub, run) == []


async def test_transcript_events_after_the_final_state_are_refused(
    hub: Instance, rogue: Rogue, run: uuid.UUID
) -> None:
    assert (await send_entries(rogue, hub, run, [entry(1)], total=2)).status_code == 200
    await report_final(rogue, hub, run, entries=2)
    response = await send_entries(rogue, hub, run, [entry(2), entry(3)], total=3)
    assert response.status_code == 409, response.text
    assert response.json()["code"] == "agent_ended"
    assert await kept(hub, run) == [(1, "assistant")]
    # What the final counted is still pulled, and no more than that.
    rogue.command_replies["agent.transcript"] = lambda ask: {
        "agentId": ask["agentId"],
        "entries": [entry(seq) for seq in range(ask["after"] + 1, 6)],
        "total": 5,
    }
    page = (await hub.call("GET", f"/agents/{run}/transcript")).json()
    assert [e["seq"] for e in page["entries"]] == [1, 2]
    assert page["complete"] is True
    assert await kept(hub, run) == [(1, "assistant"), (2, "assistant")]


BAD_PAGES: list[tuple[str, Any]] = [
    ("seq not a number", lambda ask: {**page_of(ask, 3), "entries": [entry(1) | {"seq": "x"}]}),
    ("total not a number", lambda ask: {**page_of(ask, 3), "total": "all"}),
    (
        "entries out of order",
        lambda ask: {**page_of(ask, 3), "entries": [entry(3), entry(2), entry(1)]},
    ),
    ("another agent", lambda ask: {**page_of(ask, 3), "agentId": str(uuid.uuid4())}),
    ("more than asked", lambda ask: page_of(ask, 3, count=ask["limit"] + 1)),
    ("entries not objects", lambda ask: {**page_of(ask, 3), "entries": [1, 2, 3]}),
    ("not an object", lambda ask: ["entries"]),
]


def page_of(ask: dict[str, Any], total: int, *, count: int = 3) -> Any:
    return {
        "agentId": ask["agentId"],
        "entries": [entry(seq) for seq in range(1, count + 1)],
        "total": total,
    }


@pytest.mark.parametrize(("what", "answer"), BAD_PAGES, ids=[w for w, _ in BAD_PAGES])
async def test_a_malformed_pull_reply_breaks_neither_the_transcript_nor_the_stream(
    hub: Instance, rogue: Rogue, run: uuid.UUID, what: str, answer: Any
) -> None:
    rogue.command_replies["agent.transcript"] = answer
    await report_final(rogue, hub, run, entries=3)
    response = await hub.call("GET", f"/agents/{run}/transcript")
    assert response.status_code == 200, (what, response.text)
    assert response.json()["complete"] is False
    events = await read_stream(hub, run)
    assert events[-1][0] == "state" and events[-1][1]["state"] == "completed"
    assert await kept(hub, run) == []


async def test_a_long_transcript_streams_whole_and_in_order_before_the_final(
    hub: Instance, rogue: Rogue, run: uuid.UUID
) -> None:
    count = 1234  # more than two pages of the stream
    entries = [entry(seq, f"step {seq}") for seq in range(1, count + 1)]
    assert (await send_entries(rogue, hub, run, entries)).status_code == 200
    await report_final(rogue, hub, run, entries=count)
    events = await read_stream(hub, run)
    seqs = [data["seq"] for kind, data in events if kind == "transcript"]
    assert seqs == list(range(1, count + 1))
    assert events[-1][0] == "state" and events[-1][1]["state"] == "completed"


@pytest.mark.parametrize("depth", [700, 5000])
async def test_a_pull_reply_nested_too_deep_breaks_neither_the_transcript_nor_the_stream(
    hub: Instance, rogue: Rogue, run: uuid.UUID, depth: int
) -> None:
    # No canonical JSON goes that deep, so nobody can sign it: hub must refuse it as what it
    # is (an invalid reply), whatever reads it first.
    signed_route = rogue._route

    def route(method: str, target: str, body: bytes) -> tuple[int, Any]:
        status, answer = signed_route(method, target, body)
        if isinstance(answer, dict) and answer.get("commandType") == "agent.transcript":
            call = entry(1, kind="tool_call", name="run_command", input="DEEP")
            page = {"agentId": str(run), "entries": [call], "total": 1}
            deep = '{"command":' * depth + '"deep"' + "}" * depth
            text = json.dumps({**answer, "payload": page}).replace('"DEEP"', deep)
            return status, text.encode()
        return status, answer

    rogue._route = route  # type: ignore[method-assign]
    await report_final(rogue, hub, run, entries=1)
    response = await hub.call("GET", f"/agents/{run}/transcript")
    assert response.status_code == 200, response.text
    assert response.json()["complete"] is False
    events = await read_stream(hub, run)
    assert events[-1][0] == "state" and events[-1][1]["state"] == "completed"
    assert await kept(hub, run) == []


async def test_the_executors_final_settles_a_kill_the_requester_still_owes_it(
    hub: Instance, rogue: Rogue, run: uuid.UUID
) -> None:
    """Issue 20: hub ended the run `killed` without the executor's word (its kill pending:
    the executor cannot be reached from hub), and the executor's final event says it had
    completed. That is how the run ended: hub records it, and owes no kill any more, even if
    its kill never reaches the executor."""
    await hub.fetch(
        "UPDATE agents SET state = 'killed', error = 'killed here, not confirmed',"
        " finished_at = now(), kill_delivery = 'pending', kill_confirmed = false"
        " WHERE agent_id = $1",
        run,
    )
    await report_final(rogue, hub, run, entries=0)
    agent = (await hub.call("GET", f"/agents/{run}")).json()
    assert (agent["state"], agent["result"]["summary"], agent["error"]) == (
        "completed",
        "done",
        None,
    ), agent
    assert (agent["killDelivery"], agent["killConfirmed"]) == ("too_late", True), agent
    # A later final changes nothing: the kill is settled, the run's end is final.
    report = {"agentId": str(run), "seq": 6, "state": "failed", "error": "late"}
    event = rogue.envelope("EVENT", hub.id, report, command_type="agent.state")
    assert (await rogue.post(hub.url, "event", event)).status_code == 200
    assert (await hub.call("GET", f"/agents/{run}")).json()["state"] == "completed"


async def test_the_executors_final_settles_a_kill_recorded_while_its_event_was_admitted(
    hub: Instance, rogue: Rogue, run: uuid.UUID
) -> None:
    """The race behind the test above: hub's ingress reads the run (running, no kill owed),
    then hub records its own end (`timed_out`, its kill pending) before the event's update
    gets the row. The event is not applied (the row is final), and it must still settle the
    kill from what the row is then, not from the read before: the executor completed."""
    holder = await hub.db()
    try:
        record = holder.transaction()
        await record.start()
        await holder.execute("SELECT 1 FROM agents WHERE agent_id = $1 FOR UPDATE", run)
        event = asyncio.create_task(report_final(rogue, hub, run, entries=0))
        # The ingress has read the row and now waits for the lock this transaction holds.
        for _ in range(200):
            waiting = await hub.fetch(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%UPDATE agents SET seq%'"
            )
            if waiting:
                break
            await asyncio.sleep(0.05)
        assert waiting, "the event's update never waited for the row"
        await holder.execute(
            "UPDATE agents SET state = 'timed_out', error = 'no final state in time',"
            " finished_at = now(), kill_delivery = 'pending', kill_confirmed = false"
            " WHERE role = 'requester' AND agent_id = $1",
            run,
        )
        await record.commit()
        await asyncio.wait_for(event, 30)
    finally:
        await holder.close()
    agent = (await hub.call("GET", f"/agents/{run}")).json()
    assert (agent["state"], agent["killDelivery"]) == ("completed", "too_late"), agent
