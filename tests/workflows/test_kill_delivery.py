"""A kill the requester decided without the executor's word is delivered by a
KillDeliveryWorkflow (`deliver-kill/{agentId}`), retried with backoff until the executor
answers (issue 20, point 2)."""

from __future__ import annotations

import asyncpg
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError

import workflows.models as m
from tests.workflows.peer import ScriptedPeer, save_history
from tests.workflows.test_paths import final_status, start_requester
from tests.workflows.test_races import kill, wait_for
from tests.workflows.test_reconciler import insert_run, state_of
from worker.reconciler import Reconciler
from workflows.kill_delivery import KillDeliveryWorkflow


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
