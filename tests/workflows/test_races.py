"""Races and hard cases of both workflows, each driven step by step against the real server."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

from temporalio.api.enums.v1 import EventType, WorkflowTaskFailedCause
from temporalio.client import Client, WithStartWorkflowOperation, WorkflowExecutionStatus
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError

import workflows.models as m
from tests.workflows.peer import (
    ScriptedPeer,
    run_input,
    save_history,
    spawn_input,
    workflow_of,
)
from tests.workflows.test_paths import final_status, start_executor, start_requester
from workflows.agent_run import AgentRunWorkflow
from workflows.remote_agent import RemoteAgentWorkflow


async def closed_status(client: Client, handle) -> WorkflowExecutionStatus:  # type: ignore[no-untyped-def]
    described = await client.get_workflow_handle(handle.id).describe()
    assert described.status is not None
    return described.status


async def history_length(client: Client, handle) -> int:  # type: ignore[no-untyped-def]
    return len((await client.get_workflow_handle(handle.id).fetch_history()).events)


async def kill(handle) -> m.KillResult:  # type: ignore[no-untyped-def]
    return await handle.execute_update(workflow_of(handle).kill, m.KillRequest(), id="kill")


async def wait_for(condition, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.02)


# --- point 2: telling the requester never fails a run ------------------------------------


async def test_requester_refusing_the_final_event_leaves_the_run_completed(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    peer.release_run.set()
    peer.notify_error = ApplicationError("413", type="payload_too_large", non_retryable=True)
    handle = await start_executor(client, task_queue)
    status = await final_status(handle)
    await save_history(client, handle, "executor-notify-refused")
    assert status.state == "completed"
    assert [f.state for f in peer.executor_finals] == ["completed"]
    assert await closed_status(client, handle) == WorkflowExecutionStatus.COMPLETED


async def test_unreachable_requester_is_retried_then_given_up_without_failing(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    peer.release_run.set()
    peer.notify_error = ApplicationError("connect refused", type="peer_unreachable")
    agent_id = str(uuid.uuid4())
    from tests.workflows.peer import run_input

    inp = run_input(agent_id)
    handle = await client.start_workflow(
        AgentRunWorkflow.run,
        m.AgentRunInput(
            envelope=inp.envelope, received_at=inp.received_at, notify_deadline_seconds=3
        ),
        id=m.agent_run_workflow_id("hub", agent_id),
        task_queue=task_queue,
    )
    status = await final_status(handle)
    assert status.state == "completed"
    assert peer.calls.count(m.NOTIFY_REQUESTER) >= 2  # retried
    assert await closed_status(client, handle) == WorkflowExecutionStatus.COMPLETED


async def test_silence_and_chatty_progress_space_the_requesters_checks_ever_further(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """Progress (a new seq, the same state) wakes no workflow and resets no quiet spell: each
    status check that finds no new state doubles the spell, up to its bound, so a run held for
    hours costs a check every few minutes and no activity slot in between."""
    handle = await start_requester(
        client, task_queue, poll_after_quiet_seconds=0.2, status_check_max_seconds=0.8
    )
    seq = 2
    while peer.status_checks < 6:  # chatty progress all along
        peer.set_status(m.AgentEvent(seq=seq, state=m.AgentState.RUNNING, progress={"turn": seq}))
        seq += 1
        await asyncio.sleep(0.02)
    peer.set_status(m.AgentEvent(seq=900, state=m.AgentState.COMPLETED, result={"summary": "ok"}))
    status = await final_status(handle)
    await save_history(client, handle, "requester-long-run-chatty-progress")
    assert (status.state, status.seq) == ("completed", 900)
    history = await client.get_workflow_handle(handle.id).fetch_history()
    spells = [
        e.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta().total_seconds()
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_TIMER_STARTED
    ]
    assert spells[:6] == [0.2, 0.4, 0.8, 0.8, 0.8, 0.8]


# --- point 3: one writer of a final state --------------------------------------------------


async def test_kill_racing_completion_keeps_the_result(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """Executor: the agent finished, the workflow is still telling the requester; a kill now
    answers completed, with the result."""
    peer.notify_gate.clear()  # the workflow is still telling the requester
    peer.release_run.set()
    peer.run_outcome = m.AgentOutcome(summary="ok", result={"summary": "ok"})
    handle = await start_executor(client, task_queue)
    await wait_for(lambda: bool(peer.executor_finals))
    answer = await kill(handle)
    peer.notify_gate.set()
    assert (answer.state, answer.result) == ("completed", {"summary": "ok"})
    status = await final_status(handle)
    assert status.state == "completed"
    assert [f.state for f in peer.executor_finals] == ["completed"]
    await save_history(client, handle, "executor-kill-racing-completion")


async def test_requester_kill_racing_completion_keeps_the_result(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    async def already_completed() -> m.KillResult:
        return m.KillResult(
            agent_id="x",
            state=m.AgentState.COMPLETED,
            seq=7,
            result={"summary": "done first"},
            error=None,
        )

    peer.kill_answer = already_completed
    handle = await start_requester(client, task_queue)
    await wait_for(lambda: peer.status_checks >= 1)
    answer = await kill(handle)
    status = await final_status(handle)
    await save_history(client, handle, "requester-kill-racing-completion")
    assert (answer.state, answer.result) == ("completed", {"summary": "done first"})
    assert (status.state, status.result) == ("completed", {"summary": "done first"})
    # send_kill wrote the executor's answer into the projection; the record (the store keeps
    # the first final) repeats it and overwrites nothing.
    assert [(f.state, f.result) for f in peer.requester_finals] == [
        ("completed", {"summary": "done first"})
    ]


async def test_a_cancel_whose_kill_finds_the_run_completed_closes_completed(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """Cancelling the workflow is a kill; when the executor answers that the run completed
    first, the run ended as it ended: the workflow keeps the result and closes Completed."""

    async def already_completed() -> m.KillResult:
        return m.KillResult(
            agent_id="x",
            state=m.AgentState.COMPLETED,
            seq=7,
            result={"summary": "done first"},
            error=None,
        )

    peer.kill_answer = already_completed
    handle = await start_requester(client, task_queue)
    await wait_for(lambda: peer.status_checks >= 1)
    await handle.cancel()
    status = await final_status(handle)
    await save_history(client, handle, "requester-cancel-finds-completed")
    assert (status.state, status.result) == ("completed", {"summary": "done first"})
    assert m.SEND_KILL in peer.calls
    assert await closed_status(client, handle) == WorkflowExecutionStatus.COMPLETED


async def test_kill_racing_failure_keeps_the_failure_reason(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    async def already_failed() -> m.KillResult:
        return m.KillResult(
            agent_id="x", state=m.AgentState.FAILED, seq=7, result=None, error="tests failed"
        )

    peer.kill_answer = already_failed
    handle = await start_requester(client, task_queue)
    await wait_for(lambda: peer.status_checks >= 1)
    answer = await kill(handle)
    status = await final_status(handle)
    assert (answer.state, answer.error) == ("failed", "tests failed")
    assert (status.state, status.error) == ("failed", "tests failed")


async def test_a_retried_kill_is_the_same_kill(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    handle = await start_requester(client, task_queue)
    await wait_for(lambda: peer.status_checks >= 1)
    first, second = await asyncio.gather(
        handle.execute_update(RemoteAgentWorkflow.kill, m.KillRequest(), id="kill"),
        handle.execute_update(RemoteAgentWorkflow.kill, m.KillRequest(), id="kill"),
    )
    assert first == second
    assert first.state == "killed"
    assert peer.calls.count(m.SEND_KILL) == 1


# --- point 4: a requester run always ends ----------------------------------------------------


async def test_requester_without_news_ends_timed_out_at_its_deadline(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    peer.status_answer = ApplicationError("gone", type="agent_not_found", non_retryable=True)
    handle = await start_requester(
        client,
        task_queue,
        options={"timeout": 1, "maxRetries": 1},
        spawn_deadline_seconds=1,
        deadline_grace_seconds=1,
    )
    status = await final_status(handle)
    await save_history(client, handle, "requester-timed-out")
    assert status.state == "timed_out"
    assert "no final state from spoke within 4 s" in (status.error or "")
    assert await closed_status(client, handle) == WorkflowExecutionStatus.FAILED


async def test_kill_with_the_peer_gone_answers_at_once_unconfirmed(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    peer.kill_error = ApplicationError(
        "connection is SUSPENDED", type="connection_not_active", non_retryable=True
    )
    handle = await start_requester(client, task_queue)
    await wait_for(lambda: peer.status_checks >= 1)
    answer = await kill(handle)
    status = await final_status(handle)
    await save_history(client, handle, "requester-killed-peer-gone")
    assert (answer.state, answer.confirmed) == ("killed", False)
    assert "not confirmed by spoke" in (status.error or "")
    assert peer.requester_finals[-1].state == "killed"


async def test_long_run_continues_as_new_and_still_ends_once(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    handle = await start_requester(
        client, task_queue, continue_as_new_after_events=12, options={"timeout": 30}
    )
    first_run = (await handle.describe()).run_id
    latest = client.get_workflow_handle(handle.id)
    for seq, state in ((2, "running"), (3, "spawning"), (4, "running"), (5, "spawning")):
        await latest.signal(RemoteAgentWorkflow.on_event, m.AgentEvent(seq=seq, state=state))
        await asyncio.sleep(0.2)
    await latest.signal(
        RemoteAgentWorkflow.on_event,
        m.AgentEvent(seq=9, state=m.AgentState.COMPLETED, result={"summary": "ok"}),
    )
    status = await final_status(latest)
    assert (status.state, status.result) == ("completed", {"summary": "ok"})
    first = client.get_workflow_handle(handle.id, run_id=first_run)
    assert (await first.describe()).status == WorkflowExecutionStatus.CONTINUED_AS_NEW
    assert [f.state for f in peer.requester_finals] == ["completed"]
    assert peer.calls.count(m.SEND_SPAWN) == 1
    await save_history(client, first, "requester-continued-as-new")


# --- events on the network -------------------------------------------------------------------


async def test_duplicate_and_reordered_events_change_nothing_after_the_final_one(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    handle = await start_requester(client, task_queue)
    for event in (
        m.AgentEvent(seq=3, state=m.AgentState.RUNNING),
        m.AgentEvent(seq=3, state=m.AgentState.RUNNING),
        m.AgentEvent(seq=2, state=m.AgentState.SPAWNING),
        m.AgentEvent(seq=5, state=m.AgentState.COMPLETED, result={"summary": "first final"}),
        m.AgentEvent(seq=4, state=m.AgentState.RUNNING),
        m.AgentEvent(seq=6, state=m.AgentState.FAILED, error="late"),
    ):
        await handle.signal(RemoteAgentWorkflow.on_event, event)
    status = await final_status(handle)
    await save_history(client, handle, "requester-duplicate-reordered-events")
    assert (status.state, status.seq, status.result) == ("completed", 5, {"summary": "first final"})
    # A late event may arrive while the record runs and make it run again (see the next test).
    assert peer.requester_finals
    assert {f.state for f in peer.requester_finals} == {"completed"}


async def failed_tasks(client: Client, handle) -> list[str]:  # type: ignore[no-untyped-def]
    """Why each of the workflow's failed workflow tasks failed (the run's first execution)."""
    history = await client.get_workflow_handle(handle.id).fetch_history()
    return [
        WorkflowTaskFailedCause.Name(e.workflow_task_failed_event_attributes.cause)
        for e in history.events
        if e.HasField("workflow_task_failed_event_attributes")
    ]


async def test_an_event_arriving_while_the_final_is_recorded_keeps_the_first_final(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """The record is a local activity, run inside the workflow task that closes the workflow.
    An event arriving meanwhile fails that task (an unhandled command) and Temporal drops its
    local activity's marker: the retried task records again. Local activities run at least
    once (a worker crash does the same), so the promise is that the repeat carries the first
    final, never the late event, and the store keeps one (test_records_repeat.py)."""
    peer.record_gate.clear()
    handle = await start_requester(client, task_queue)
    await handle.signal(
        RemoteAgentWorkflow.on_event,
        m.AgentEvent(seq=5, state=m.AgentState.COMPLETED, result={"summary": "first"}),
    )
    await wait_for(lambda: m.RECORD_REQUESTER_FINAL in peer.calls)
    # Accepted by the server once signal() returns; buffered there while the task is open.
    await handle.signal(
        RemoteAgentWorkflow.on_event, m.AgentEvent(seq=6, state=m.AgentState.FAILED, error="late")
    )
    peer.record_gate.set()
    status = await final_status(handle)
    await save_history(client, handle, "requester-event-while-recording")
    assert (status.state, status.seq, status.result) == ("completed", 5, {"summary": "first"})
    first = m.RequesterFinal(
        agent_id=status.agent_id,
        state=m.AgentState.COMPLETED,
        result={"summary": "first"},
        error=None,
    )
    assert peer.requester_finals == [first, first]  # the race happened: recorded again
    assert await failed_tasks(client, handle) == ["WORKFLOW_TASK_FAILED_CAUSE_UNHANDLED_COMMAND"]


async def test_a_cancel_while_a_polled_completion_is_recorded_leaves_the_run_completed(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """A status check brings `completed`; a cancel (UI, CLI) arrives while it is recorded. The
    retried task holds both the poll's answer and the cancel: the run had ended, so no kill
    is sent and the workflow closes Completed, saying what the store kept."""
    peer.record_gate.clear()
    handle = await start_requester(client, task_queue)
    await wait_for(lambda: peer.status_checks >= 1)
    peer.set_status(m.AgentEvent(seq=4, state=m.AgentState.COMPLETED, result={"summary": "polled"}))
    await wait_for(lambda: m.RECORD_REQUESTER_FINAL in peer.calls)
    await handle.cancel()  # accepted by the server once cancel() returns
    peer.record_gate.set()
    status = await final_status(handle)
    await save_history(client, handle, "requester-cancel-while-recording-polled")
    assert (status.state, status.result) == ("completed", {"summary": "polled"})
    assert m.SEND_KILL not in peer.calls
    assert {f.state for f in peer.requester_finals} == {"completed"}
    assert await closed_status(client, handle) == WorkflowExecutionStatus.COMPLETED


async def test_a_cancel_while_a_spawn_failure_is_recorded_keeps_the_failure(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """The spawn is refused and `failed` is being recorded when a cancel arrives: the retried
    task sees the cancel first and kills a run the executor never had (unconfirmed). The
    store kept `failed`, and so does the workflow: it closes Failed with the refusal."""
    peer.record_gate.clear()
    peer.spawn_answer = ApplicationError("no", type="grant_agent_type", non_retryable=True)
    peer.kill_error = ApplicationError("no such agent", type="agent_not_found", non_retryable=True)
    handle = await start_requester(client, task_queue)
    await wait_for(lambda: m.RECORD_REQUESTER_FINAL in peer.calls)
    await handle.cancel()
    peer.record_gate.set()
    status = await final_status(handle)
    await save_history(client, handle, "requester-cancel-while-recording-failed")
    assert status.state == "failed" and "grant_agent_type" in (status.error or "")
    assert peer.requester_finals[0].state == "failed"
    assert await closed_status(client, handle) == WorkflowExecutionStatus.FAILED


async def test_a_cancel_while_a_killed_run_is_recorded_keeps_the_kill_as_recorded(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """The requester's kill: the executor records `killed` (a local activity) and answers the
    update in the task that closes the workflow. A cancel arriving meanwhile fails that task;
    the retried task sees the cancel first and words the kill its own way. The workflow says
    what the store kept; a kill it is, and the cancel closes it Canceled."""
    handle = await start_executor(client, task_queue)
    await peer.sandbox_started.wait()
    peer.record_gate.clear()
    answer = asyncio.create_task(
        handle.execute_update(AgentRunWorkflow.kill, m.KillRequest(answered=True), id="kill")
    )
    await wait_for(lambda: m.RECORD_RUN_FINAL in peer.calls)
    await handle.cancel()  # accepted by the server once cancel() returns
    peer.record_gate.set()
    assert (await answer).state == "killed"
    status = await final_status(handle)
    await save_history(client, handle, "executor-cancel-while-recording-kill")
    first = peer.executor_finals[0]
    assert (first.state, first.error) == ("killed", "killed by user")
    assert (status.state, status.error) == (first.state, first.error)
    assert len(peer.executor_finals) == 2  # the race happened: recorded again
    assert m.NOTIFY_REQUESTER not in peer.calls
    assert await closed_status(client, handle) == WorkflowExecutionStatus.CANCELED


# --- point 5 and 14.9: cancel is a kill, the UI shows failures -------------------------------


async def test_cancelling_the_executor_workflow_kills_the_agent(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    handle = await start_executor(client, task_queue)
    await peer.sandbox_started.wait()
    await handle.cancel()
    status = await final_status(handle)
    await save_history(client, handle, "executor-workflow-cancelled")
    assert status.state == "killed"
    assert peer.sandboxes_gone == 1
    assert [f.state for f in peer.executor_finals] == ["killed"]
    assert [f.state for f in peer.notified] == ["killed"]
    assert await closed_status(client, handle) == WorkflowExecutionStatus.CANCELED


async def test_a_run_that_completes_after_its_status_was_unavailable_reports_no_error(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    peer.status_answer = ApplicationError("not ACTIVE", type="not_active", non_retryable=True)
    handle = await start_requester(client, task_queue)
    await wait_for(lambda: peer.status_checks >= 1)
    await asyncio.sleep(0.3)
    peer.set_status(m.AgentEvent(seq=4, state=m.AgentState.COMPLETED, result={"summary": "ok"}))
    status = await final_status(handle)
    assert (status.state, status.result, status.error) == ("completed", {"summary": "ok"}, None)


async def test_cancelling_the_requester_workflow_kills_the_remote_agent(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """Cancelling RemoteAgentWorkflow (UI, CLI) is a kill too: the executor is told to stop the
    run, and the requester records the executor's answer before the workflow closes."""
    handle = await start_requester(client, task_queue)
    await wait_for(lambda: peer.status_checks >= 1)
    await handle.cancel()
    status = await final_status(handle)
    await save_history(client, handle, "requester-workflow-cancelled")
    assert status.state == "killed"
    assert m.SEND_KILL in peer.calls
    # send_kill wrote the executor's answer already; the record repeats it.
    assert [f.state for f in peer.requester_finals] == ["killed"]
    assert await closed_status(client, handle) == WorkflowExecutionStatus.CANCELED


async def test_cancelling_the_requester_workflow_with_the_peer_gone_still_records_killed(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    peer.kill_error = ApplicationError("connect refused", type="peer_unreachable")
    handle = await start_requester(client, task_queue, kill_deadline_seconds=2)
    await wait_for(lambda: peer.status_checks >= 1)
    await handle.cancel()
    status = await final_status(handle)
    assert status.state == "killed"
    assert "not confirmed" in (status.error or "")
    assert [f.state for f in peer.requester_finals] == ["killed"]
    assert await closed_status(client, handle) == WorkflowExecutionStatus.CANCELED


async def cancel_while_recording(client: Client, handle, peer: ScriptedPeer) -> None:  # type: ignore[no-untyped-def]
    """Cancel the workflow while its record (a local activity) waits, then let the record end."""
    await handle.cancel()

    async def cancel_delivered() -> bool:
        history = await client.get_workflow_handle(handle.id).fetch_history()
        return any(
            e.HasField("workflow_execution_cancel_requested_event_attributes")
            for e in history.events
        )

    for _ in range(200):
        if await cancel_delivered():
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(2.0)  # a workflow task more: the cancel has been handled
    peer.record_gate.set()


async def test_cancelling_the_requester_workflow_while_it_records_keeps_the_final_state(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    peer.record_gate.clear()
    peer.spawn_answer = ApplicationError("no", type="grant_agent_type", non_retryable=True)
    agent_id = str(uuid.uuid4())
    handle = await client.start_workflow(
        RemoteAgentWorkflow.run,
        spawn_input(agent_id),
        id=m.remote_agent_workflow_id(agent_id),
        task_queue=task_queue,
        task_timeout=timedelta(seconds=2),  # see the executor's test below
    )
    await wait_for(lambda: m.RECORD_REQUESTER_FINAL in peer.calls)
    await cancel_while_recording(client, handle, peer)
    status = await final_status(handle)
    await save_history(client, handle, "requester-cancelled-while-recording")
    assert status.state == "failed"
    assert [f.state for f in peer.requester_finals] == ["failed"]


async def test_cancelling_the_executor_workflow_while_it_records_keeps_the_result(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """The agent finished; the store is slow to record it when an operator cancels the
    workflow: the result is recorded all the same (nothing left to kill), and the requester
    is told."""
    peer.record_gate.clear()
    peer.release_run.set()
    peer.run_outcome = m.AgentOutcome(summary="ok", result={"summary": "ok"})
    agent_id = str(uuid.uuid4())
    handle = await client.start_workflow(
        AgentRunWorkflow.run,
        run_input(agent_id),
        id=m.agent_run_workflow_id("hub", agent_id),
        task_queue=task_queue,
        # A long local activity keeps its workflow task open; the worker heartbeats it at 80%
        # of this timeout, and that is when the cancel reaches the workflow.
        task_timeout=timedelta(seconds=2),
    )
    await wait_for(lambda: m.RECORD_RUN_FINAL in peer.calls)
    await cancel_while_recording(client, handle, peer)
    status = await final_status(handle)
    await save_history(client, handle, "executor-cancelled-while-recording")
    assert (status.state, status.result) == ("completed", {"summary": "ok"})
    assert [f.state for f in peer.executor_finals] == ["completed"]
    assert [f.state for f in peer.notified] == ["completed"]


async def test_failed_agent_workflow_ends_failed_with_the_reason_after_recording(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    peer.release_run.set()
    peer.run_outcome = ApplicationError("3 tests failed", type=m.AGENT_FAILED)
    handle = await start_executor(client, task_queue)
    status = await final_status(handle)
    assert status.state == "failed"
    assert [f.state for f in peer.executor_finals] == ["failed"]
    described = await client.get_workflow_handle(handle.id).describe()
    assert described.status == WorkflowExecutionStatus.FAILED
    history = await client.get_workflow_handle(handle.id).fetch_history()
    failed = history.events[-1].workflow_execution_failed_event_attributes
    assert "3 tests failed" in failed.failure.message


# --- point 6: timeouts mean what they say ----------------------------------------------------


async def test_try_lost_to_crashing_workers_is_reported_as_lost_workers(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    deadlines: list[str] = []

    async def never_heartbeats(task: m.RunTask) -> m.AgentOutcome:
        deadlines.append(task.deadline)
        await asyncio.sleep(60)  # its worker is gone: no heartbeat, no answer
        raise AssertionError("unreachable")

    peer.run_script = never_heartbeats
    handle = await start_executor(client, task_queue, heartbeatInterval=0.2)
    status = await final_status(handle)
    await save_history(client, handle, "executor-lost-workers")
    assert status.state == "failed"
    assert (status.error or "").startswith("lost workers")
    # One deadline for the try, whichever worker runs it.
    assert len(deadlines) >= 2 and len(set(deadlines)) == 1
    history = await client.get_workflow_handle(handle.id).fetch_history()
    scheduled = next(
        e.activity_task_scheduled_event_attributes
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
        and e.activity_task_scheduled_event_attributes.activity_type.name == m.RUN_AGENT
    )
    assert scheduled.heartbeat_timeout.ToTimedelta().total_seconds() == 2.0  # follows 0.2 s
    assert scheduled.schedule_to_close_timeout.ToTimedelta().total_seconds() == 90.0


async def test_a_kill_of_a_try_whose_workers_died_ends_killed(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """A kill asked while the try's worker is gone (a connection's end, its workers crashed):
    the cancel can only end by the heartbeat timeout, and the sandbox died with its worker.
    The run ends `killed`, as the kill said (the requester says `killed` too), not
    `failed` for lost workers."""
    started = asyncio.Event()

    async def never_heartbeats(task: m.RunTask) -> m.AgentOutcome:
        started.set()
        await asyncio.sleep(60)  # its worker is gone: no heartbeat, no answer
        raise AssertionError("unreachable")

    peer.run_script = never_heartbeats
    handle = await start_executor(client, task_queue, heartbeatInterval=0.5)
    await asyncio.wait_for(started.wait(), 10)
    answer = await handle.execute_update(
        AgentRunWorkflow.kill, m.KillRequest(reason="connection suspended"), id="kill"
    )
    status = await final_status(handle)
    assert (answer.state, status.state, status.error) == (
        "killed",
        "killed",
        "connection suspended",
    )
    assert [f.state for f in peer.executor_finals] == ["killed"]


# --- point 8: kill of a spawn not started yet -------------------------------------------------


async def test_kill_before_the_workflow_started_never_sends_the_spawn(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    agent_id = str(uuid.uuid4())
    start = WithStartWorkflowOperation(
        RemoteAgentWorkflow.run,
        spawn_input(agent_id),
        id=m.remote_agent_workflow_id(agent_id),
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )
    answer = await client.execute_update_with_start_workflow(
        RemoteAgentWorkflow.kill, m.KillRequest(), start_workflow_operation=start, id="kill"
    )
    handle = await start.workflow_handle()
    status = await final_status(handle)
    await save_history(client, handle, "requester-killed-before-start")
    assert answer.state == "killed"
    assert status.error == "killed before the spawn was sent"
    assert m.SEND_SPAWN not in peer.calls


async def test_kill_during_spawn_waits_for_the_spawn_then_kills_remotely(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    peer.spawn_gate.clear()
    handle = await start_requester(client, task_queue)
    await wait_for(lambda: m.SEND_SPAWN in peer.calls)
    pending = asyncio.create_task(kill(handle))
    await asyncio.sleep(0.3)
    assert not pending.done()
    peer.spawn_gate.set()
    answer = await pending
    assert (answer.state, answer.confirmed) == ("killed", True)
    assert peer.calls.count(m.SEND_KILL) == 1


async def test_kill_of_a_waiting_executor_run_is_answered_after_the_sandbox_is_gone(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    handle = await start_executor(client, task_queue)
    await peer.sandbox_started.wait()
    answer = await kill(handle)
    assert answer.state == "killed"
    assert peer.sandboxes_gone == 1
    assert [f.state for f in peer.executor_finals] == ["killed"]
    status = await final_status(handle)
    assert status.state == "killed"
    assert await closed_status(client, handle) == WorkflowExecutionStatus.COMPLETED
