"""A run whose record already ended here (killed while its workflow did not exist yet, repaired
by the reconciler) never starts its agent when its workflow starts after all (real
PostgreSQL; the activity runs in Temporal's activity test environment)."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

import workflows.models as m
from activities.agents import AgentActivities
from federation.settings import Settings
from federation.store import repos


async def test_an_agent_killed_before_its_workflow_started_never_runs(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    agent_id, connection_id = uuid.uuid4(), uuid.uuid4()
    requester = f"hub-{agent_id.hex[:8]}"
    await repos.insert_connection(
        pool,
        connection_id=connection_id,
        remote_instance_id=requester,
        remote_name="hub",
        remote_url="http://127.0.0.1:9",
        remote_keys=[],
        direction="inbound",
        status="ACTIVE",
        grants={"commandTypes": ["agent.spawn", "agent.status"], "agentTypes": ["worker"]},
    )
    await repos.insert_agent(
        pool,
        agent_id=agent_id,
        role="executor",
        connection_id=connection_id,
        peer_instance_id=requester,
        task_id="t",
        agent_type="worker",
        context={},
        options={},
        workflow_id=m.agent_run_workflow_id(requester, str(agent_id)),
        state="spawning",
    )
    # The operator's kill found no workflow (its start had failed): the run is recorded killed.
    await repos.update_executed_agent(
        pool, requester, agent_id, state="killed", error="killed: its workflow does not exist"
    )
    settings = Settings(instance_name="unit", data_dir=tmp_path)  # type: ignore[call-arg]
    async with httpx.AsyncClient() as http:
        activities = AgentActivities(pool, http, settings)
        task = m.RunTask(
            agent_id=str(agent_id),
            requester_id=requester,
            connection_id=str(uuid.uuid4()),
            task_id="t",
            agent_type="worker",
            context={"instructions": "$ true"},
            timeout_seconds=60,
            max_retries=0,
            workflow_id=m.agent_run_workflow_id(requester, str(agent_id)),
        )
        with pytest.raises(ApplicationError) as refused:
            await ActivityEnvironment().run(activities.run_agent, task)
    assert refused.value.non_retryable
    assert "already ended killed" in refused.value.message
    row = await repos.get_executed_agent(pool, requester, agent_id)
    assert row is not None
    assert (row["state"], row["started_at"]) == ("killed", None)
    assert not (tmp_path / "workspaces" / requester / str(agent_id)).exists()
