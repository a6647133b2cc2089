"""A kill the requester decided without the executor's word is delivered by a
KillDeliveryWorkflow (`deliver-kill/{agentId}`), retried with backoff until the executor
answers (issue 20, point 2)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

import workflows.models as m
from tests.workflows.peer import ScriptedPeer, save_history, spawn_input
from tests.workflows.test_paths import final_status, start_requester
from tests.workflows.test_races import kill, wait_for
from tests.workflows.test_reconciler import insert_run, state_of, walk_from_the_start
from worker.reconciler import Reconciler
from workflows.kill_delivery import KillDeliveryWorkflow
from workflows.remote_agent import RemoteAgentWorkflow


async def delivered(client: Client, agent_id: str) -> m.KillResult:
    handle = client.get_workflow_handle_for(
        KillDeliveryWorkflow.run, m.kill_delivery_workflow_id(agent_id)
    )
    return await handle.result()


async def test_an_unconfirmed_kill_is_delivered_once_the_executor_answers(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    peer.kill_error = ApplicationError("connect refused", type="peer_unreachable")
    peer.delivery_error = ApplicationError("connect refused", type="peer_unreachable")
    handle = await start_requester(client, task_queue, kill_deadline_seconds=2)
    await wait_for(lambda: peer.status_checks >= 1)
    answer = await kill(handle)
    assert (answer.state, answer.confirmed) == ("killed", False)
    assert (await final_status(handle)).state == "killed"
    # Still unreachable: tried again, with backoff, while the requester's workflow is closed.
    await wait_for(lambda: len(peer.deliveries) >= 2, timeout=30)
    peer.delivery_error = None
    result = await delivered(client, answer.agent_id)
    assert result.state == "killed"
    delivery = client.get_workflow_handle(m.kill_delivery_workflow_id(answer.agent_id))
    await save_history(client, delivery, "kill-delivered-after-retries")
    await save_history(client, handle, "requester-killed-delivery-started")
    assert {d.agent_id for d in peer.deliveries} == {answer.agent_id}


async def test_the_requesters_own_time_out_is_delivered_to_the_executor(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    peer.status_answer = ApplicationError("gone", type="peer_unreachable", non_retryable=True)
    handle = await start_requester(
        client,
        task_queue,
        options={"timeout": 1, "maxRetries": 0},
        spawn_deadline_seconds=1,
        deadline_grace_seconds=1,
    )
    assert (await final_status(handle)).state == "timed_out"
    agent_id = handle.id.removeprefix("remote-agent/")
    assert (await delivered(client, agent_id)).state == "killed"


async def test_a_confirmed_kill_and_a_run_the_executor_ended_start_no_delivery(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    killed = await start_requester(client, task_queue)
    await wait_for(lambda: peer.status_checks >= 1)
    assert (await kill(killed)).confirmed
    completed = await start_requester(client, task_queue)
    peer.set_status(m.AgentEvent(seq=5, state=m.AgentState.COMPLETED, result={"ok": True}))
    assert (await final_status(completed)).state == "completed"
    for handle in (killed, completed):
        await final_status(handle)
        agent_id = handle.id.removeprefix("remote-agent/")
        delivery = client.get_workflow_handle(m.kill_delivery_workflow_id(agent_id))
        try:
            described = await delivery.describe()
        except Exception:  # noqa: BLE001 - NOT_FOUND: none was started, as it should be
            continue
        assert described.status != WorkflowExecutionStatus.RUNNING, "a delivery was started"
        raise AssertionError(f"a delivery was started for {agent_id}")
    assert peer.deliveries == []


async def test_a_requester_run_the_reconciler_ends_is_killed_on_the_executor(
    client: Client, task_queue: str, peer: ScriptedPeer, pool: asyncpg.Pool
) -> None:
    handle = await start_requester(client, task_queue)
    agent_id = handle.id.removeprefix("remote-agent/")
    await wait_for(lambda: peer.status_checks >= 1)
    await insert_run(pool, "requester", handle.id, agent_id)
    await handle.terminate("operator cleanup")

    reconciler = Reconciler(pool, client, interval=0.01, task_queue=task_queue)
    await reconciler.reconcile_once()  # (the store is shared: other tests' rows too)
    assert await state_of(pool, agent_id) == (
        "killed",
        "its workflow was terminated without recording a final state",
    )
    assert (await delivered(client, agent_id)).state == "killed"
    assert agent_id in [d.agent_id for d in peer.deliveries]


class TemporalAwayOnce(Reconciler):
    """The reconciler as it is, with Temporal away the first time it starts a delivery."""

    def __init__(self, *args: Any, failing: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failing = failing

    async def tell_executor(self, row: dict[str, Any]) -> None:
        if str(row["agent_id"]) == self.failing:
            self.failing = ""
            raise RPCError("Temporal is away", RPCStatusCode.UNAVAILABLE, b"")
        await super().tell_executor(row)


async def test_a_repaired_run_whose_delivery_could_not_start_is_still_killed_on_the_executor(
    client: Client, task_queue: str, peer: ScriptedPeer, pool: asyncpg.Pool
) -> None:
    """The reconciler ends a terminated requester's run and starts its kill's delivery; with
    Temporal away at that moment, a later round still starts it (the run is not left final
    here and running there for good)."""
    handle = await start_requester(client, task_queue)
    agent_id = handle.id.removeprefix("remote-agent/")
    await wait_for(lambda: peer.status_checks >= 1)
    await insert_run(pool, "requester", handle.id, agent_id)
    await handle.terminate("operator cleanup")

    reconciler = TemporalAwayOnce(
        pool, client, interval=0.01, batch=10_000, task_queue=task_queue, failing=agent_id
    )
    await reconciler.reconcile_once()  # the row's failure is logged; the round goes on
    assert (await state_of(pool, agent_id))[0] == "killed"  # recorded, its kill pending
    assert reconciler.failing == ""  # the delivery's start was tried, and failed
    await pool.execute(
        "UPDATE agents SET updated_at = now() - interval '1 minute' WHERE agent_id = $1",
        uuid.UUID(agent_id),
    )
    await walk_from_the_start(pool)
    await asyncio.sleep(0.05)  # the next round is due
    await reconciler.reconcile_once()
    assert (await asyncio.wait_for(delivered(client, agent_id), 30)).state == "killed"
    assert agent_id in [d.agent_id for d in peer.deliveries]


async def test_a_spawn_whose_answer_never_came_is_killed_on_the_executor(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """The spawn may have reached the executor with only its answers lost: the requester
    that gives up on it (failed, "spawn not delivered") has the executor told to stop it, so
    it does not run there to its end unseen. A spawn the executor refused starts nothing."""
    peer.spawn_answer = ApplicationError("read timeout", type="peer_unreachable")
    lost = await start_requester(client, task_queue, spawn_deadline_seconds=2)
    status = await final_status(lost)
    assert status.state == "failed"
    assert "spawn not delivered" in (status.error or "")
    agent_id = lost.id.removeprefix("remote-agent/")
    assert (await asyncio.wait_for(delivered(client, agent_id), 30)).state == "killed"

    peer.spawn_answer = ApplicationError("no", type="grant_agent_type", non_retryable=True)
    refused = await start_requester(client, task_queue)
    assert (await final_status(refused)).state == "failed"
    refused_id = refused.id.removeprefix("remote-agent/")
    with pytest.raises(RPCError):
        await client.get_workflow_handle(m.kill_delivery_workflow_id(refused_id)).describe()
    assert [d.agent_id for d in peer.deliveries] == [agent_id]


async def test_a_final_the_store_kept_from_an_event_not_heard_here_is_the_workflows_own(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """The requester's workflow times out while the executor's final event, received by the
    API, is already in the store (the signal not yet heard): the record answers `completed`,
    the workflow says and closes so, and tells the executor nothing (no delivery)."""
    agent_id = str(uuid.uuid4())
    peer.status_answer = ApplicationError("gone", type="peer_unreachable", non_retryable=True)
    peer.requester_finals.append(
        m.RequesterFinal(
            agent_id=agent_id, state=m.AgentState.COMPLETED, result={"summary": "by the event"}
        )
    )
    handle = await client.start_workflow(
        RemoteAgentWorkflow.run,
        spawn_input(
            agent_id,
            options={"timeout": 1, "maxRetries": 0},
            spawn_deadline_seconds=1,
            deadline_grace_seconds=1,
        ),
        id=m.remote_agent_workflow_id(agent_id),
        task_queue=task_queue,
    )
    status = await final_status(handle)
    assert peer.requester_finals[-1].state == "timed_out"  # what the workflow decided
    assert (status.state, status.result) == ("completed", {"summary": "by the event"})
    assert (await handle.describe()).status == WorkflowExecutionStatus.COMPLETED
    with pytest.raises(RPCError):
        await client.get_workflow_handle(m.kill_delivery_workflow_id(agent_id)).describe()
