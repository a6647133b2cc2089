"""The reconciler repairs rows whose workflow closed without recording (real PostgreSQL and
Temporal); and the state trigger wakes long-polls at once."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

import workflows.models as m
from federation.states import AgentState
from federation.store import notifications, repos
from federation.store.db import create_pool
from federation.store.jobs import instance_job
from tests.workflows.peer import ScriptedPeer, run_input, spawn_input
from tests.workflows.test_paths import start_requester
from worker.reconciler import JOB, Reconciler
from workflows.agent_run import AgentRunWorkflow
from workflows.remote_agent import RemoteAgentWorkflow


async def insert_run(
    pool: asyncpg.Pool,
    role: str,
    workflow_id: str,
    agent_id: str,
    *,
    state: str = "running",
    quiet: str = "1 minute",
) -> None:
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
        state=state,
    )
    await pool.execute(
        "UPDATE agents SET updated_at = now() - $2::text::interval"
        + (", workflow_started = true" if role == "requester" else "")
        + " WHERE agent_id = $1",
        uuid.UUID(agent_id),
        quiet,
    )


async def walk_from_the_start(pool: asyncpg.Pool) -> None:
    """The reconciler's next round starts from the first open run (tests share the store)."""
    await pool.execute("DELETE FROM instance_jobs WHERE name = $1", JOB)


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

    await walk_from_the_start(pool)
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


async def test_a_terminated_run_behind_a_hundred_quiet_ones_is_repaired(
    client: Client, task_queue: str, pool: asyncpg.Pool
) -> None:
    """Issue 20 point 5: 120 quiet open runs (their workflow runs) were looked at first every
    round, for ever; the walk goes on past them, so the terminated run behind is repaired."""
    alive = await start_requester(client, task_queue)
    # Behind them whichever way runs are ordered: touched later, and last in key order.
    quiet = [str(uuid.UUID("00" + uuid.uuid4().hex[2:])) for _ in range(120)]
    for agent_id in quiet:
        await insert_run(pool, "executor", alive.id, agent_id, quiet="2 minutes")
    ended_id = str(uuid.UUID("ff" + uuid.uuid4().hex[2:]))
    ended = await client.start_workflow(
        AgentRunWorkflow.run,
        run_input(ended_id),
        id=m.agent_run_workflow_id("hub", ended_id),
        task_queue=task_queue,
    )
    await insert_run(pool, "executor", ended.id, ended_id)
    await ended.terminate("operator cleanup")
    await walk_from_the_start(pool)
    reconciler = Reconciler(pool, client, interval=0.01)
    try:
        for _ in range(4):  # 121 open runs and a few of other tests: two or three rounds
            await asyncio.sleep(0.05)
            await reconciler.reconcile_once()
        assert (await state_of(pool, ended_id))[0] == "killed"
        states = await pool.fetch(
            "SELECT DISTINCT state FROM agents WHERE agent_id = ANY($1::uuid[])", quiet
        )
        assert [r["state"] for r in states] == ["running"]  # their workflow still runs
    finally:
        await pool.execute("DELETE FROM agents WHERE agent_id = ANY($1::uuid[])", quiet)
        await alive.terminate("test over")


async def test_two_reconcilers_of_one_instance_do_not_both_work_a_round(
    client: Client, task_queue: str, pool: asyncpg.Pool, database: str
) -> None:
    """Once per instance: while another process holds the job a reconciler skips its round;
    and a round another process finished less than an interval ago is not worked again."""
    agent_id = str(uuid.uuid4())
    ended = await client.start_workflow(
        AgentRunWorkflow.run,
        run_input(agent_id),
        id=m.agent_run_workflow_id("hub", agent_id),
        task_queue=task_queue,
    )
    await insert_run(pool, "executor", ended.id, agent_id)
    await ended.terminate("operator cleanup")
    await walk_from_the_start(pool)
    other_pool = await create_pool(database)  # another worker of the same instance
    try:
        first = Reconciler(pool, client, interval=5.0)
        second = Reconciler(other_pool, client, interval=5.0)
        async with instance_job(other_pool, JOB) as held:
            assert held  # another process is working its round now
            assert await first.reconcile_once() is None
            assert await state_of(pool, agent_id) == ("running", None)
        worked = await first.reconcile_once()
        assert worked is not None
        assert (await state_of(pool, agent_id))[0] == "killed"
        assert await second.reconcile_once() is None  # the instance's round was just worked
    finally:
        await other_pool.close()


async def test_a_spawn_whose_start_answered_503_is_not_failed_before_the_requester_retries(
    client: Client, task_queue: str, pool: asyncpg.Pool
) -> None:
    """The executor commits the run's row before it asks Temporal to start the workflow; a
    start refused (Temporal away: 503) leaves the row `spawning` with no workflow until the
    requester retries the spawn. The reconciler leaves such a row alone for a grace period
    (a retry may still come) and records it failed only after that."""
    agent_id = str(uuid.uuid4())
    workflow_id = m.agent_run_workflow_id("hub", agent_id)
    await insert_run(pool, "executor", workflow_id, agent_id, state="spawning")
    await walk_from_the_start(pool)
    reconciler = Reconciler(pool, client, interval=0.01, start_grace=600.0)
    await reconciler.reconcile_once()
    assert await state_of(pool, agent_id) == ("spawning", None)
    # The requester's retry comes: the ingress starts the workflow of the row it kept.
    retried = await client.start_workflow(
        AgentRunWorkflow.run, run_input(agent_id), id=workflow_id, task_queue=task_queue
    )
    await asyncio.sleep(0.05)
    await reconciler.reconcile_once()
    assert await state_of(pool, agent_id) == ("spawning", None)
    await retried.terminate("test over")
    # No retry ever came for another one: past the grace its slot is given back.
    lost_id = str(uuid.uuid4())
    await insert_run(
        pool, "executor", m.agent_run_workflow_id("hub", lost_id), lost_id, state="spawning"
    )
    await pool.execute(
        "UPDATE agents SET created_at = now() - interval '11 minutes' WHERE agent_id = $1",
        uuid.UUID(lost_id),
    )
    await walk_from_the_start(pool)
    await reconciler.reconcile_once()
    assert await state_of(pool, lost_id) == (
        "failed",
        "its workflow does not exist without recording a final state",
    )


class FailingOn(Reconciler):
    """The reconciler as it is, but asking Temporal about one row fails (a row it cannot
    handle: a bad workflow id, a query that breaks, Temporal refusing that one call)."""

    def __init__(self, *args: Any, failing: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failing = failing

    async def _verdict(self, row: dict[str, Any]) -> tuple[AgentState, str] | None:
        if str(row["agent_id"]) == self.failing:
            raise RPCError("this row breaks", RPCStatusCode.INTERNAL, b"")
        return await super()._verdict(row)


async def test_one_row_that_fails_does_not_stop_the_round(
    client: Client, task_queue: str, pool: asyncpg.Pool
) -> None:
    """Issue 20 point 5: a row the reconciler cannot handle is logged and left to a later
    round; the rows after it in the same round are repaired all the same."""
    bad_id, ended_id = sorted(str(uuid.uuid4()) for _ in range(2))
    for agent_id in (bad_id, ended_id):
        run = await client.start_workflow(
            AgentRunWorkflow.run,
            run_input(agent_id),
            id=m.agent_run_workflow_id("hub", agent_id),
            task_queue=task_queue,
        )
        await insert_run(pool, "executor", run.id, agent_id)
        await run.terminate("operator cleanup")
    await walk_from_the_start(pool)
    reconciler = FailingOn(pool, client, interval=0.01, batch=10_000, failing=bad_id)
    await reconciler.reconcile_once()
    assert (await state_of(pool, ended_id))[0] == "killed"
    assert await state_of(pool, bad_id) == ("running", None)  # left to a later round
    await asyncio.sleep(0.05)
    reconciler.failing = ""
    await reconciler.reconcile_once()
    assert (await state_of(pool, bad_id))[0] == "killed"
