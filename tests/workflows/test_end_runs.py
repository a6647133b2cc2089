"""The runs of a connection that ended are killed by EndConnectionRunsWorkflow, started once per
change, whoever starts it (the API, the peer's ingress, the reconciler's sweep when Temporal
was away as the change was made): issue 20, point 3."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest
from temporalio.client import Client
from temporalio.worker import Worker

import workflows.models as m
from activities.connections import ConnectionActivities
from federation.settings import Settings
from federation.states import ConnectionStatus
from federation.store import repos
from operations.connections import end_runs_of_ended_connections
from tests.workflows.peer import ScriptedPeer, run_input, save_history
from tests.workflows.test_paths import final_status
from workflows.agent_run import AgentRunWorkflow
from workflows.end_runs import EndConnectionRunsWorkflow


@pytest.fixture
async def queue(client: Client, peer: ScriptedPeer, pool: asyncpg.Pool) -> AsyncIterator[str]:
    name = f"end-{uuid.uuid4()}"
    ends = ConnectionActivities(pool, client, Settings(task_queue=name))
    async with Worker(
        client,
        task_queue=name,
        workflows=[AgentRunWorkflow, EndConnectionRunsWorkflow],
        activities=[*peer.activities(), ends.end_connection_runs],
        max_heartbeat_throttle_interval=timedelta(seconds=0.1),
        default_heartbeat_throttle_interval=timedelta(seconds=0.1),
    ):
        yield name


async def test_the_sweep_ends_the_runs_of_a_connection_that_ended_while_temporal_was_away(
    client: Client, queue: str, peer: ScriptedPeer, pool: asyncpg.Pool
) -> None:
    requester = f"hub-{uuid.uuid4().hex[:8]}"
    agent_id = str(uuid.uuid4())
    run = await client.start_workflow(
        AgentRunWorkflow.run,
        run_input(agent_id),
        id=m.agent_run_workflow_id(requester, agent_id),
        task_queue=queue,
    )
    await peer.sandbox_started.wait()
    connection = await repos.insert_connection(
        pool,
        connection_id=uuid.uuid4(),
        remote_instance_id=requester,
        remote_name="hub",
        remote_url="http://127.0.0.1:9",
        remote_keys=[],
        direction="inbound",
        status=ConnectionStatus.SUSPENDED,
    )
    await repos.insert_agent(
        pool,
        agent_id=uuid.UUID(agent_id),
        role="executor",
        connection_id=connection["connection_id"],
        peer_instance_id=requester,
        task_id="t",
        agent_type="coder",
        context={},
        options={},
        workflow_id=run.id,
        state="running",
    )
    settings = Settings(task_queue=queue)
    # The suspension was made while Temporal was away: nothing was started for it.
    await end_runs_of_ended_connections(pool, client, settings)
    await end_runs_of_ended_connections(pool, client, settings)  # the same change: once

    assert (await final_status(run)).state == "killed"
    assert peer.executor_finals[-1].error == "connection suspended"
    ends = [
        w.id
        async for w in client.list_workflows(
            f"WorkflowType = 'EndConnectionRunsWorkflow' AND TaskQueue = '{queue}'"
        )
    ]
    assert len(ends) == 1 and ends[0].startswith(f"end-runs/{connection['connection_id']}/")
    await save_history(client, client.get_workflow_handle(ends[0]), "end-runs-killed")
