"""Fewer messages and workflow tasks per run, and a kill answered in one workflow task.

Each test drives the real workflows on the real dev server (see conftest.py) and checks what
the history and the scripted peer saw, never a timing.
"""

from __future__ import annotations

import asyncio

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

import workflows.models as m
from operations.updates import execute_kill
from tests.workflows.peer import ScriptedPeer, save_history
from tests.workflows.test_paths import final_status, start_executor, start_requester


async def event_types(client: Client, handle) -> list[str]:  # type: ignore[no-untyped-def]
    history = await client.get_workflow_handle(handle.id).fetch_history()
    return [EventType.Name(e.event_type).removeprefix("EVENT_TYPE_") for e in history.events]


async def test_events_that_bring_every_change_leave_the_requester_nothing_to_ask(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """A short run: its events (signals) bring running and completed before the quiet spell
    ends, so the requester never long-polls agent.status (one command per run: the spawn)."""
    peer.spawn_answer = m.AgentEvent(1, "spawning")
    handle = await start_requester(client, task_queue, poll_after_quiet_seconds=30.0)
    await handle.signal("on_event", m.AgentEvent(2, "running"))
    await asyncio.sleep(0.3)
    await handle.signal("on_event", m.AgentEvent(3, "completed", result={"summary": "ok"}))
    status = await final_status(handle)
    await save_history(client, handle, "requester-completed-by-events")
    assert (status.state, status.result) == ("completed", {"summary": "ok"})
    assert peer.status_waits == 0
    assert peer.calls.count(m.SEND_SPAWN) == 1
    assert "ACTIVITY_TASK_CANCEL_REQUESTED" not in await event_types(client, handle)


async def test_a_lost_event_is_asked_for_once_the_quiet_spell_ends(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """No event comes: after the quiet spell one long-poll finds the final state."""
    peer.set_status(m.AgentEvent(4, "completed", result={"summary": "polled"}))
    handle = await start_requester(client, task_queue, poll_after_quiet_seconds=0.5)
    status = await final_status(handle)
    assert (status.state, status.result) == ("completed", {"summary": "polled"})
    assert peer.status_waits == 1
    types = await event_types(client, handle)
    assert types.count("TIMER_FIRED") == 1  # the quiet spell, then the poll


async def test_a_kill_is_answered_in_the_workflow_task_that_sent_it(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """The kill is a local activity: accepted and answered by the same workflow task, no
    activity task and no second workflow task before the answer."""
    handle = await start_requester(client, task_queue)
    await asyncio.sleep(0.2)  # the spawn is settled
    answer = await handle.execute_update(
        "kill", m.KillRequest(), id="kill", result_type=m.KillResult
    )
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
    """The executor's event (completed) arrives while the kill's answer is on its way: the
    workflow task that would answer the kill and close the workflow fails (an unhandled
    command), and Temporal drops the update. The caller's kill asks again and is answered."""
    handle = await start_requester(client, task_queue)
    await asyncio.sleep(0.2)

    async def completed_meanwhile() -> m.KillResult:
        await handle.signal("on_event", m.AgentEvent(7, "completed", result={"summary": "first"}))
        await asyncio.sleep(0.3)  # the signal lands while this workflow task is open
        return m.KillResult(handle.id, "completed", 7, {"summary": "first"}, None)

    peer.kill_answer = completed_meanwhile
    await execute_kill(handle, m.KillRequest())  # neither raises nor hangs
    status = await final_status(handle)
    assert (status.state, status.result) == ("completed", {"summary": "first"})
    assert "WORKFLOW_TASK_FAILED" in await event_types(client, handle)  # the race happened


async def test_a_kill_the_requester_asked_sends_it_no_event(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """The requester hears the final state in its kill's answer; an event as well would race
    that answer. A kill by this executor's admin is still told by an event."""
    asked = await start_executor(client, task_queue)
    await peer.sandbox_started.wait()
    answer = await asked.execute_update(
        "kill", m.KillRequest(answered=True), id="kill", result_type=m.KillResult
    )
    assert answer.state == "killed"
    assert (await final_status(asked)).state == "killed"
    await save_history(client, asked, "executor-killed-answered")
    assert m.NOTIFY_REQUESTER not in peer.calls

    peer.sandbox_started.clear()
    by_admin = await start_executor(client, task_queue)
    await peer.sandbox_started.wait()
    await by_admin.execute_update(
        "kill", m.KillRequest(reason="killed by admin"), id="kill", result_type=m.KillResult
    )
    assert (await final_status(by_admin)).state == "killed"
    assert [f.state for f in peer.notified] == ["killed"]
