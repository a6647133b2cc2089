"""The requester's spawn outbox: a row Temporal refuses to start backs off on its own and does
not hold up the spawns behind it (no transaction or lock spans a Temporal call)."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.conftest import Instance

pytestmark = pytest.mark.e2e


async def insert_unstarted(
    hub: Instance, connection_id: str, peer: str, *, instructions: str, age_seconds: int
) -> str:
    """A spawn the API committed but whose workflow never started (an API crash right after)."""
    agent_id = str(uuid.uuid4())
    conn = await hub.db()
    try:
        await conn.execute(
            "INSERT INTO agents (agent_id, role, connection_id, peer_instance_id, task_id,"
            " agent_type, context, options, workflow_id, state, workflow_started, created_at)"
            " VALUES ($1, 'requester', $2, $3, 'outbox', 'worker', $4::jsonb, $5::jsonb, $6,"
            " 'spawning', false, now() - make_interval(secs => $7))",
            uuid.UUID(agent_id),
            uuid.UUID(connection_id),
            peer,
            json.dumps(
                {
                    "repository": None,
                    "branch": None,
                    "workItems": [],
                    "instructions": instructions,
                    "model": None,
                }
            ),
            json.dumps({"timeout": 60, "maxRetries": 0, "queue": False}),
            f"remote-agent/{agent_id}",
            float(age_seconds),
        )
    finally:
        await conn.close()
    return agent_id


async def test_a_spawn_temporal_refuses_to_start_does_not_hold_up_the_others(
    hub: Instance, spoke: Instance, hub_spoke: str
) -> None:
    # Older, so the sweeper meets it first: its input is over Temporal's payload size limit.
    bad = await insert_unstarted(
        hub, hub_spoke, spoke.id, instructions="$ true\n" + "#" * 3_000_000, age_seconds=60
    )
    good = await insert_unstarted(
        hub, hub_spoke, spoke.id, instructions="$ echo behind > behind.txt", age_seconds=30
    )
    try:
        agent = await hub.wait_agent(good, timeout=90)
        assert agent["state"] == "completed", agent
        rows = await hub.fetch(
            "SELECT workflow_started, start_attempts, start_error, next_start_at"
            " FROM agents WHERE role = 'requester' AND agent_id = $1",
            uuid.UUID(bad),
        )
        assert len(rows) == 1
        row = rows[0]
        # Still unstarted, its attempts counted, its reason kept, its next attempt scheduled.
        assert row["workflow_started"] is False
        assert row["start_attempts"] >= 1
        assert row["start_error"], row
        assert row["next_start_at"] is not None
        print("refused start:", row["start_error"])
    finally:
        await hub.fetch(
            "DELETE FROM agents WHERE role = 'requester' AND agent_id = $1", uuid.UUID(bad)
        )
