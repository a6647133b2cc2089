"""The reconciler repairs rows whose workflow closed without recording (real PostgreSQL and
Temporal); and the state trigger wakes long-polls at once."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
from temporalio.client import Client

import workflows.models as m
from federation.store import notifications, repos
from tests.workflows.peer import ScriptedPeer, run_input, spawn_input
from tests.workflows.test_paths import start_requester
from worker.reconciler import Reconciler
from workflows.agent_run import AgentRunWorkflow
from workflows.remote_agent import RemoteAgentWorkflow


async def insert_run(pool: asyncpg.Pool, role: str, workflow_id: str, agent_id: str) -> None:
    await repos.insert_agent(
        pool,
        agent_id=uuid.UUID(agent_id),
        role=role,
        connection_id=uuid.uuid4(),
        peer_instance_id="hub" if role == "executor" else "spoke",
        task_id="t",
        agent_type="coder",
        context={},
        options={},
        workflow_id=workflow_id,
        state="running",
    )
    await pool.execute(
        "UPDATE agents SET updated_at = now() - interval '1 minute'"
        + (", workflow_started = true" if role == "requester" else "")
        + " WHERE agent_id = $1",
        uuid.UUID(agent_id),
    )


async def state_of(pool: asyncpg.Pool, agent_id: str) -> tuple[str, str | None]:
    row = await pool.fetchrow("SELECT state, error FROM agents WHERE agent_id = $1", agent_id)
    assert row is not None
    return row["state"], row["error"]


async def test_terminated_workflows_leave_no_row_running_and_free_capacity(
    client: Client, task_queue: str, peer: ScriptedPeer, pool: asyncpg.Pool
) -> None:
    executor_id, requester_id, alive_id = (str(uuid.uuid4()) for _ in range(3))
    executor = await client.start_workflow(
        AgentRunWorkflow.run,
        run_input(executor_id),
        id=m.agent_run_workflow_id("hub", executor_id),
        task_queue=task_queue,
    )
    requester = await client.start_workflow(
        RemoteAgentWorkflow.run,
        spawn_input(requester_id),
        id=m.remote_agent_workflow_id(requester_id),
        task_queue=task_queue,
    )
    alive = await start_requester(client, task_queue)
    alive_id = alive.id.removeprefix("remote-agent/")
    await peer.sandbox_started.wait()
    await insert_run(pool, "executor", executor.id, executor_id)
    await insert_run(pool, "requester", requester.id, requester_id)
    await insert_run(pool, "requester", alive.id, alive_id)
    assert await repos.count_running_executed(pool) == 1
    await executor.terminate("operator cleanup")
    await requester.terminate("operator cleanup")

    repaired = await Reconciler(pool, client, interval=0.01).reconcile_once()

    assert repaired == 2
    assert await state_of(pool, executor_id) == (
        "killed",
        "its workflow was terminated without recording a final state",
    )
    assert (await state_of(pool, requester_id))[0] == "killed"
    assert (await state_of(pool, alive_id))[0] == "running"  # its workflow still runs
    assert await repos.count_running_executed(pool) == 0
    await alive.terminate("test over")


async def test_a_state_change_wakes_a_waiting_long_poll_at_once(
    pool: asyncpg.Pool, database: str
) -> None:
    agent_id = str(uuid.uuid4())
    await insert_run(pool, "executor", "wf", agent_id)
    listener = notifications.Listener(database, (notifications.AGENT_STATE,))
    key = notifications.agent_key("executor", "hub", agent_id)
    try:
        waiting = asyncio.create_task(listener.wait(notifications.AGENT_STATE, key, 30.0))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await repos.update_executed_agent(pool, "hub", uuid.UUID(agent_id), progress={"t": 1})
        await asyncio.sleep(0.2)
        assert not waiting.done()  # progress is no state change
        await repos.update_executed_agent(pool, "hub", uuid.UUID(agent_id), state="completed")
        assert await asyncio.wait_for(waiting, 5.0) is True
    finally:
        await listener.close()
