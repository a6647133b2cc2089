"""The worker's agent-run interceptor: a kill reaches a running agent without waiting for a
heartbeat, and a try's deadline holds whichever worker runs it (real worker, PostgreSQL
NOTIFY and Temporal; the sandbox is the scripted double)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest
from temporalio.client import Client
from temporalio.worker import Worker

import workflows.models as m
from federation.store import notifications
from tests.workflows.peer import ScriptedPeer, run_input
from tests.workflows.test_paths import final_status
from worker.interceptor import AgentRunInterceptor
from workflows.agent_run import AgentRunWorkflow
from workflows.remote_agent import RemoteAgentWorkflow


@pytest.fixture
async def guarded_queue(client: Client, peer: ScriptedPeer, database: str) -> AsyncIterator[str]:
    listener = notifications.Listener(database, (notifications.KILL,))
    queue = f"wf-{uuid.uuid4()}"
    try:
        async with Worker(
            client,
            task_queue=queue,
            workflows=[RemoteAgentWorkflow, AgentRunWorkflow],
            activities=peer.activities(),
            interceptors=[AgentRunInterceptor(listener)],
            # Heartbeats as rare as they come: only the NOTIFY can be quick.
            max_heartbeat_throttle_interval=timedelta(seconds=30),
            default_heartbeat_throttle_interval=timedelta(seconds=30),
        ):
            yield queue
    finally:
        await listener.close()


async def test_kill_notice_stops_the_sandbox_without_waiting_for_a_heartbeat(
    client: Client, guarded_queue: str, peer: ScriptedPeer, pool: asyncpg.Pool
) -> None:
    agent_id = str(uuid.uuid4())
    handle = await client.start_workflow(
        AgentRunWorkflow.run,
        run_input(agent_id, heartbeatInterval=20),
        id=m.agent_run_workflow_id("hub", agent_id),
        task_queue=guarded_queue,
    )
    await peer.sandbox_started.wait()
    await notifications.send(
        pool, notifications.KILL, notifications.agent_key("executor", "hub", agent_id)
    )
    status = await final_status(handle)
    assert status.state == "killed"
    assert peer.sandboxes_gone == 1
    assert [f.state for f in peer.executor_finals] == ["killed"]


async def test_a_try_ends_timed_out_at_its_deadline_even_if_the_agent_never_stops(
    client: Client, guarded_queue: str, peer: ScriptedPeer
) -> None:
    agent_id = str(uuid.uuid4())
    handle = await client.start_workflow(
        AgentRunWorkflow.run,
        run_input(agent_id, timeout=1, heartbeatInterval=0.2),
        id=m.agent_run_workflow_id("hub", agent_id),
        task_queue=guarded_queue,
    )
    status = await final_status(handle)
    assert status.state == "timed_out"
    assert status.error == "the run exceeded its timeout of 1 s"
    assert peer.sandboxes_gone == 1
