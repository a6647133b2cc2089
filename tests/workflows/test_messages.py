"""Fewer messages and workflow tasks per run, and a kill answered in one workflow task.

Each test drives the real workflows on the real dev server (see conftest.py) and checks what
the history and the scripted peer saw, never a timing.
"""

from __future__ import annotations

import asyncio

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError

import workflows.models as m
from tests.workflows.peer import ScriptedPeer, save_history, spawn_input
from tests.workflows.test_paths import final_status, start_executor, start_requester
from tests.workflows.test_races import wait_for
from workflows.agent_run import AgentRunWorkflow
from workflows.remote_agent import RemoteAgentWorkflow


async def spawn_sent(peer: ScriptedPeer) -> None:
    """The workflow's first task ran: a kill from now on is a kill of a sent spawn."""
    await wait_for(lambda: m.SEND_SPAWN in peer.calls)


async def event_types(client: Client, handle) -> list[str]:  # type: ignore[no-untyped-def]
    history = await client.get_workflow_handle(handle.id).fetch_history()
    return [EventType.Name(e.event_type).removeprefix("EVENT_TYPE_") for e in history.events]


async def test_events_that_bring_every_change_leave_the_requester_nothing_to_ask(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """A short run: its events (signals) bring running and completed before the quiet spell
    ends, so the requester never asks agent.status (one command per run: the spawn)."""
    peer.spawn_answer = m.AgentEvent(seq=1, state=m.AgentState.SPAWNING)
    handle = await start_requester(client, task_queue, poll_after_quiet_seconds=30.0)
    await handle.signal(
        RemoteAgentWorkflow.on_event, m.AgentEvent(seq=2, state=m.AgentState.RUNNING)
    )
    await spawn_sent(peer)
    await handle.signal(
        RemoteAgentWorkflow.on_event,
        m.AgentEvent(seq=3, state=m.AgentState.COMPLETED, result={"summary": "ok"}),
    )
    status = await final_status(handle)
    await save_history(client, handle, "requester-completed-by-events")
    assert (status.state, status.result) == ("completed", {"summary": "ok"})
    assert peer.status_checks == 0
    assert peer.calls.count(m.SEND_SPAWN) == 1
    assert "ACTIVITY_TASK_CANCEL_REQUESTED" not in await event_types(client, handle)


async def test_a_lost_event_is_asked_for_once_the_quiet_spell_ends(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """No event comes: after the quiet spell one status check finds the final state."""
    peer.set_status(m.AgentEvent(seq=4, state=m.AgentState.COMPLETED, result={"summary": "polled"}))
    handle = await start_requester(client, task_queue, poll_after_quiet_seconds=0.5)
    status = await final_status(handle)
    assert (status.state, status.result) == ("completed", {"summary": "polled"})
    assert peer.status_checks == 1
    types = await event_types(client, handle)
    assert types.count("TIMER_FIRED") == 1  # the quiet spell, then the poll


async def test_a_kill_is_answered_in_the_workflow_task_that_sent_it(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """The kill is a local activity: accepted and answered by the same workflow task, no
    activity task and no second workflow task before the answer."""
    handle = await start_requester(client, task_queue)
    await spawn_sent(peer)
    answer = await handle.execute_update(RemoteAgentWorkflow.kill, m.KillRequest(), id="kill")
    assert answer.state == "killed"
    assert (await final_status(handle)).state == "killed"
    await save_history(client, handle, "requester-killed-local")
    types = await event_types(client, handle)
    accepted = types.index("WORKFLOW_EXECUTION_UPDATE_ACCEPTED")
    completed = types.index("WORKFLOW_EXECUTION_UPDATE_COMPLETED")
    assert "WORKFLOW_TASK_STARTED" not in types[accepted:completed]
    assert "MARKER_RECORDED" in types[accepted:completed]  # the local activity's result
    assert peer.calls.count(m.SEND_KILL) == 1
    history = await client.get_workflow_handle(handle.id).fetch_history()
    scheduled = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    assert m.SEND_KILL not in scheduled


async def test_an_event_ending_the_run_while_its_kill_is_answered_loses_no_kill(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """The executor's event (completed) arrives while the kill's local activity runs: the
    workflow task that answers the kill does not also close the workflow (it would fail on the
    new signal, an unhandled command, and Temporal would drop the kill's answer with it)."""
    handle = await start_requester(client, task_queue)
    await spawn_sent(peer)

    async def completed_meanwhile() -> m.KillResult:
        await handle.signal(
            RemoteAgentWorkflow.on_event,
            m.AgentEvent(seq=7, state=m.AgentState.COMPLETED, result={"summary": "first"}),
        )
        await asyncio.sleep(0.3)  # the signal lands while this workflow task is open
        return m.KillResult(
            agent_id=handle.id,
            state=m.AgentState.COMPLETED,
            seq=7,
            result={"summary": "first"},
            error=None,
        )

    peer.kill_answer = completed_meanwhile
    answer = await handle.execute_update(RemoteAgentWorkflow.kill, m.KillRequest(), id="kill")
    assert (answer.state, answer.result) == ("completed", {"summary": "first"})
    status = await final_status(handle)
    await save_history(client, handle, "requester-event-during-kill")
    assert (status.state, status.result) == ("completed", {"summary": "first"})
    assert "WORKFLOW_TASK_FAILED" not in await event_types(client, handle)
    assert peer.calls.count(m.SEND_KILL) == 1


async def test_a_cancel_during_the_kill_loses_neither_the_kill_nor_its_answer(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """The workflow is cancelled while the kill's local activity runs: the kill is answered,
    sent once, and the run ends killed."""
    handle = await start_requester(client, task_queue)
    await spawn_sent(peer)
    gate = asyncio.Event()

    async def slow() -> m.KillResult:
        await gate.wait()
        return m.KillResult(agent_id=handle.id, state=m.AgentState.KILLED, seq=99)

    peer.kill_answer = slow
    kill = asyncio.create_task(
        handle.execute_update(RemoteAgentWorkflow.kill, m.KillRequest(), id="kill")
    )
    await wait_for(lambda: m.SEND_KILL in peer.calls)  # the kill's local activity runs
    await handle.cancel()  # recorded when this returns: it came during that workflow task
    gate.set()
    answer = await asyncio.wait_for(kill, 20)
    assert (answer.state, answer.confirmed) == ("killed", True)
    status = await final_status(handle)
    await save_history(client, handle, "requester-cancel-during-kill")
    assert status.state == "killed"
    assert "WORKFLOW_TASK_FAILED" not in await event_types(client, handle)
    assert peer.calls.count(m.SEND_KILL) == 1


async def test_a_kill_with_start_of_a_running_workflow_is_answered(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """The API saw the spawn unstarted and kills with update-with-start, but the workflow had
    started meanwhile (USE_EXISTING): it is killed like any other, even with an event in the
    window."""
    handle = await start_requester(client, task_queue)
    await spawn_sent(peer)

    async def killed_meanwhile() -> m.KillResult:
        await handle.signal(
            RemoteAgentWorkflow.on_event, m.AgentEvent(seq=7, state=m.AgentState.KILLED)
        )
        await spawn_sent(peer)
        return m.KillResult(
            agent_id=handle.id, state=m.AgentState.KILLED, seq=7, result=None, error=None
        )

    peer.kill_answer = killed_meanwhile
    start = WithStartWorkflowOperation(
        RemoteAgentWorkflow.run,
        spawn_input(handle.id.split("/", 1)[1]),
        id=handle.id,
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )
    answer = await client.execute_update_with_start_workflow(
        RemoteAgentWorkflow.kill, m.KillRequest(), start_workflow_operation=start, id="kill"
    )
    assert answer.state == m.AgentState.KILLED
    assert (await final_status(handle)).state == "killed"
    assert "WORKFLOW_TASK_FAILED" not in await event_types(client, handle)


async def test_a_slow_executor_kill_ends_at_the_kill_deadline(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """The executor takes longer than the kill deadline to answer: the one local try gets half
    the deadline, the retried activity the rest; the run ends killed, not confirmed, at the
    deadline."""
    handle = await start_requester(client, task_queue, kill_deadline_seconds=3.0)
    await spawn_sent(peer)

    async def slow() -> m.KillResult:
        await asyncio.sleep(6)
        return m.KillResult(agent_id=handle.id, state=m.AgentState.KILLED, seq=99)

    peer.kill_answer = slow
    answer = await handle.execute_update(RemoteAgentWorkflow.kill, m.KillRequest(), id="kill")
    assert (answer.state, answer.confirmed) == ("killed", False)
    assert "not confirmed by spoke" in ((await final_status(handle)).error or "")
    await save_history(client, handle, "requester-kill-local-try-then-retried")
    history = await client.get_workflow_handle(handle.id).fetch_history()
    retried = [
        e.activity_task_scheduled_event_attributes
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == m.SEND_KILL
    ]
    # The retried activity gets what is left of the 3 s, after the 1.5 s local try.
    assert len(retried) == 1
    assert retried[0].schedule_to_close_timeout.ToTimedelta().total_seconds() <= 1.5
    assert peer.calls.count(m.SEND_KILL) == 2


async def test_a_kill_the_requester_asked_sends_it_no_event(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """The requester hears the final state in its kill's answer; an event as well would race
    that answer. A kill by this executor's admin is still told by an event."""
    asked = await start_executor(client, task_queue)
    await peer.sandbox_started.wait()
    answer = await asked.execute_update(
        AgentRunWorkflow.kill, m.KillRequest(answered=True), id="kill"
    )
    assert answer.state == "killed"
    assert (await final_status(asked)).state == "killed"
    await save_history(client, asked, "executor-killed-answered")
    assert m.NOTIFY_REQUESTER not in peer.calls

    peer.sandbox_started.clear()
    by_admin = await start_executor(client, task_queue)
    await peer.sandbox_started.wait()
    await by_admin.execute_update(
        AgentRunWorkflow.kill, m.KillRequest(reason="killed by admin"), id="kill"
    )
    assert (await final_status(by_admin)).state == "killed"
    assert [f.state for f in peer.notified] == ["killed"]


async def test_a_refused_poll_waits_its_backoff_and_no_quiet_spell_besides(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """The executor refuses agent.status (not ACTIVE): between checks the workflow waits the
    growing quiet spell only, one timer each."""
    peer.status_answer = ApplicationError("not ACTIVE", type="not_active", non_retryable=True)
    handle = await start_requester(client, task_queue, poll_after_quiet_seconds=1.0)
    await wait_for(lambda: peer.status_checks >= 3, timeout=30)
    types = await event_types(client, handle)
    # One quiet spell before each check.
    assert types.count("TIMER_STARTED") <= peer.status_checks + 1
    await handle.signal(
        RemoteAgentWorkflow.on_event,
        m.AgentEvent(seq=9, state=m.AgentState.COMPLETED, result={"summary": "ok"}),
    )
    assert (await final_status(handle)).state == "completed"
