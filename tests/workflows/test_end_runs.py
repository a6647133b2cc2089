"""The runs of a connection that ended are killed by EndConnectionRunsWorkflow, started once per
change, whoever starts it (the API, the peer's ingress, the reconciler's sweep when Temporal
was away as the change was made): issue 20, point 3."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
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
    # Its row stays `running` (the record is scripted): none left for other tests' reconcilers.
    await pool.execute("DELETE FROM agents WHERE agent_id = $1", uuid.UUID(agent_id))
    assert peer.executor_finals[-1].error == "connection suspended"
    ends = [
        w.id
        async for w in client.list_workflows(
            f"WorkflowType = 'EndConnectionRunsWorkflow' AND TaskQueue = '{queue}'"
        )
    ]
    assert len(ends) == 1 and ends[0].startswith(f"end-runs/{connection['connection_id']}/")
    await save_history(client, client.get_workflow_handle(ends[0]), "end-runs-killed")


async def test_a_late_end_of_a_connection_that_is_active_again_kills_none_of_its_runs(
    client: Client, queue: str, peer: ScriptedPeer, pool: asyncpg.Pool
) -> None:
    """The suspension's workflow runs only once the connection was resumed (its workers were
    down meanwhile): the runs of the connection, spawned since the resume, go on."""
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
        status=ConnectionStatus.ACTIVE,
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
    connection_id = str(connection["connection_id"])
    killed = await client.execute_workflow(
        EndConnectionRunsWorkflow.run,
        m.EndConnectionRuns(connection_id=connection_id, status=ConnectionStatus.SUSPENDED),
        id=m.end_runs_workflow_id(connection_id, "SUSPENDED-1"),
        task_queue=queue,
    )
    try:
        assert killed == 0
        peer.release_run.set()
        assert (await final_status(run)).state == "completed"
    finally:  # its row stays `running` (the scripted record): no reconciler of the shared store
        await pool.execute("DELETE FROM agents WHERE agent_id = $1", uuid.UUID(agent_id))


class TemporalAwayFor:
    """The Temporal client as it is, with its first `failures` kill updates refused (Temporal
    restarting while the connection's runs are killed)."""

    def __init__(self, client: Client, failures: int) -> None:
        self.client = client
        self.failures = failures

    def get_workflow_handle(self, workflow_id: str, **kwargs: Any) -> Any:
        handle = self.client.get_workflow_handle(workflow_id, **kwargs)
        if self.failures <= 0:
            return handle
        self.failures -= 1
        return _Unavailable()


class _Unavailable:
    async def execute_update(self, *args: Any, **kwargs: Any) -> Any:
        raise RPCError("Temporal is away", RPCStatusCode.UNAVAILABLE, b"")


async def test_a_kill_that_failed_while_a_connection_ended_is_tried_again(
    client: Client, peer: ScriptedPeer, pool: asyncpg.Pool
) -> None:
    """Issue 20 point 3: a run whose kill failed for a moment (Temporal away) is not left
    running: the workflow, which runs once per change, tries again until it is final."""
    name = f"end-{uuid.uuid4()}"
    ends = ConnectionActivities(pool, TemporalAwayFor(client, 1), Settings(task_queue=name))  # type: ignore[arg-type]
    async with Worker(
        client,
        task_queue=name,
        workflows=[AgentRunWorkflow, EndConnectionRunsWorkflow],
        activities=[*peer.activities(), ends.end_connection_runs],
        max_heartbeat_throttle_interval=timedelta(seconds=0.1),
        default_heartbeat_throttle_interval=timedelta(seconds=0.1),
    ):
        requester = f"hub-{uuid.uuid4().hex[:8]}"
        agent_id = str(uuid.uuid4())
        run = await client.start_workflow(
            AgentRunWorkflow.run,
            run_input(agent_id),
            id=m.agent_run_workflow_id(requester, agent_id),
            task_queue=name,
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
        connection_id = str(connection["connection_id"])
        try:
            ended = await client.start_workflow(
                EndConnectionRunsWorkflow.run,
                m.EndConnectionRuns(connection_id=connection_id, status=ConnectionStatus.SUSPENDED),
                id=m.end_runs_workflow_id(connection_id, "SUSPENDED-1"),
                task_queue=name,
            )
            status = await asyncio.wait_for(final_status(run), 30)
            assert status.state == "killed"
            await asyncio.wait_for(ended.result(), 30)
        finally:
            await pool.execute("DELETE FROM agents WHERE agent_id = $1", uuid.UUID(agent_id))
