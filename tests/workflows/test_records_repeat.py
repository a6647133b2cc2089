"""The final records are local activities, so they run at least once: a workflow task that
fails (an event arriving while it closes the workflow) or a worker that crashes before the task
completes runs them again. A repeat must change nothing, and a later, different final neither;
each answers the final the store keeps, which the workflow takes as its own (real PostgreSQL;
the real activities run in Temporal's activity test environment)."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import asyncpg
import httpx
from temporalio.testing import ActivityEnvironment

import workflows.models as m
from activities.federation import FederationActivities
from federation.settings import Settings
from federation.store import repos


async def add_agent(pool: asyncpg.Pool, role: str, peer: str) -> uuid.UUID:
    agent_id, connection_id = uuid.uuid4(), uuid.uuid4()
    await repos.insert_connection(
        pool,
        connection_id=connection_id,
        remote_instance_id=peer,
        remote_name=peer,
        remote_url="http://127.0.0.1:9",
        remote_keys=[],
        direction="outbound" if role == "requester" else "inbound",
        status="ACTIVE",
        grants={"commandTypes": ["agent.spawn"], "agentTypes": ["worker"]},
    )
    await repos.insert_agent(
        pool,
        agent_id=agent_id,
        role=role,
        connection_id=connection_id,
        peer_instance_id=peer,
        task_id="t",
        agent_type="worker",
        context={},
        options={},
        workflow_id=f"{role}/{agent_id}",
        state="running",
    )
    return agent_id


async def agent_row(pool: asyncpg.Pool, agent_id: uuid.UUID) -> dict[str, object]:
    row = await pool.fetchrow(
        "SELECT state, seq, result, error, finished_at FROM agents WHERE agent_id = $1", agent_id
    )
    assert row is not None
    return dict(row)


async def test_a_requester_final_recorded_again_changes_nothing_and_answers_the_first(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    agent_id = await add_agent(pool, "requester", f"spoke-{uuid.uuid4().hex[:8]}")
    settings = Settings(instance_name="unit", data_dir=tmp_path)  # type: ignore[call-arg]
    async with httpx.AsyncClient() as http:
        record = FederationActivities(pool, http, settings).record_requester_final
        final = m.RequesterFinal(
            agent_id=str(agent_id),
            state=m.AgentState.COMPLETED,
            result={"summary": "first"},
            error=None,
        )
        kept = await ActivityEnvironment().run(record, final)
        assert (kept.state, kept.result, kept.written) == ("completed", None, True)
        first = await agent_row(pool, agent_id)
        # The retried workflow task: the same final, its own (the workflow has the result).
        assert await ActivityEnvironment().run(record, final) == kept
        late = m.RequesterFinal(
            agent_id=str(agent_id),
            state=m.AgentState.KILLED,
            result=None,
            error="killed here (workflow cancelled)",
        )
        # The workflow takes this answer as its final: the first one, not its own.
        assert await ActivityEnvironment().run(record, late) == m.RecordedFinal(
            state=m.AgentState.COMPLETED,
            result={"summary": "first"},
            error=None,
            seq=kept.seq,
            written=False,
        )
    assert await agent_row(pool, agent_id) == first
    assert first["state"] == "completed" and first["finished_at"] is not None
    events = await pool.fetch("SELECT state FROM agent_events WHERE agent_id = $1", agent_id)
    assert [e["state"] for e in events] == ["completed"]


async def test_an_executor_final_recorded_again_answers_the_first_with_its_sequence_number(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    requester = f"hub-{uuid.uuid4().hex[:8]}"
    agent_id = await add_agent(pool, "executor", requester)
    settings = Settings(instance_name="unit", data_dir=tmp_path)  # type: ignore[call-arg]
    async with httpx.AsyncClient() as http:
        record = FederationActivities(pool, http, settings).record_run_final
        final = m.FinishRun(
            agent_id=str(agent_id),
            requester_id=requester,
            state=m.AgentState.KILLED,
            result=None,
            error="killed by the requester",
        )
        kept = await ActivityEnvironment().run(record, final)
        assert (kept.state, kept.error, kept.written) == ("killed", "killed by the requester", True)
        first = await agent_row(pool, agent_id)
        # The workflow takes the answer of a repeat as its final, sequence number included.
        assert await ActivityEnvironment().run(record, final) == kept
        late = m.FinishRun(
            agent_id=str(agent_id),
            requester_id=requester,
            state=m.AgentState.COMPLETED,
            result={"summary": "late"},
            error=None,
        )
        assert await ActivityEnvironment().run(record, late) == dataclasses.replace(
            kept, written=False
        )
    assert await agent_row(pool, agent_id) == first
    assert (first["state"], first["seq"]) == ("killed", kept.seq)
