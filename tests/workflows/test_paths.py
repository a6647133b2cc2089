"""Every path of both workflows, run for real; with FEDAGENT_RECORD_HISTORIES=<prefix> each test
also saves its history under tests/workflows/histories/ for the replay test."""

from __future__ import annotations

import asyncio
import uuid

from temporalio.client import Client
from temporalio.exceptions import ApplicationError

import workflows.models as m
from tests.workflows.peer import ScriptedPeer, run_input, save_history, spawn_input, workflow_of
from workflows.agent_run import AgentRunWorkflow
from workflows.remote_agent import RemoteAgentWorkflow


async def start_requester(client: Client, queue: str, **overrides: object):  # type: ignore[no-untyped-def]
    agent_id = str(uuid.uuid4())
    return await client.start_workflow(
        RemoteAgentWorkflow.run,
        spawn_input(agent_id, **overrides),  # type: ignore[arg-type]
        id=m.remote_agent_workflow_id(agent_id),
        task_queue=queue,
    )


async def start_executor(client: Client, queue: str, **options: object):  # type: ignore[no-untyped-def]
    agent_id = str(uuid.uuid4())
    return await client.start_workflow(
        AgentRunWorkflow.run,
        run_input(agent_id, **options),
        id=m.agent_run_workflow_id("hub", agent_id),
        task_queue=queue,
    )


async def final_status(handle) -> m.AgentStatus:  # type: ignore[no-untyped-def]
    """The workflow's own final word, whether it closed Completed or Failed."""
    try:
        await handle.result()
    except Exception as exc:  # noqa: BLE001 - a failed agent may end the workflow Failed
        print("workflow ended with", repr(exc), repr(getattr(exc, "cause", None)))
    return await handle.query(workflow_of(handle).status)


async def test_requester_completed_from_the_final_event(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    handle = await start_requester(client, task_queue)
    await handle.signal(
        RemoteAgentWorkflow.on_event,
        m.AgentEvent(seq=2, state=m.AgentState.COMPLETED, result={"summary": "ok"}),
    )
    status = await final_status(handle)
    await save_history(client, handle, "requester-completed")
    assert (status.state, status.result) == ("completed", {"summary": "ok"})
    assert peer.requester_finals[-1].state == "completed"


async def test_requester_learns_the_final_state_when_the_event_is_lost(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    peer.set_status(m.AgentEvent(seq=3, state=m.AgentState.COMPLETED, result={"summary": "polled"}))
    handle = await start_requester(client, task_queue)
    status = await final_status(handle)
    await save_history(client, handle, "requester-lost-final-event")
    assert (status.state, status.result) == ("completed", {"summary": "polled"})


async def test_requester_spawn_refused_ends_failed(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    peer.spawn_answer = ApplicationError("no", type="grant_agent_type", non_retryable=True)
    handle = await start_requester(client, task_queue)
    status = await final_status(handle)
    await save_history(client, handle, "requester-spawn-refused")
    assert status.state == "failed"
    assert "grant_agent_type" in (status.error or "")


async def test_requester_kill_while_running_is_killed(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    handle = await start_requester(client, task_queue)
    answer = await handle.execute_update(RemoteAgentWorkflow.kill, m.KillRequest())
    assert answer.state == "killed"
    status = await final_status(handle)
    await save_history(client, handle, "requester-killed-running")
    assert status.state == "killed"


async def test_requester_kill_during_spawn_waits_for_the_spawn_then_kills(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    peer.spawn_gate.clear()
    handle = await start_requester(client, task_queue)
    kill = asyncio.create_task(handle.execute_update(RemoteAgentWorkflow.kill, m.KillRequest()))
    await asyncio.sleep(0.3)
    peer.spawn_gate.set()
    assert (await kill).state == "killed"
    assert (await final_status(handle)).state == "killed"
    await save_history(client, handle, "requester-killed-during-spawn")


async def test_executor_completed(client: Client, task_queue: str, peer: ScriptedPeer) -> None:
    peer.release_run.set()
    handle = await start_executor(client, task_queue)
    status = await final_status(handle)
    await save_history(client, handle, "executor-completed")
    assert status.state == "completed"
    assert peer.executor_finals[-1].state == "completed"


async def test_executor_failed_then_retried_completes(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    tries: list[int] = []

    async def script(task: m.RunTask) -> m.AgentOutcome:
        tries.append(task.attempt)
        if task.attempt == 1:
            raise ApplicationError("exit 1", {"summary": "exit 1"}, type=m.AGENT_FAILED)
        return m.AgentOutcome(summary="ok", result={"summary": "ok"})

    peer.run_script = script
    handle = await start_executor(client, task_queue, maxRetries=1)
    status = await final_status(handle)
    await save_history(client, handle, "executor-failed-retried")
    assert (status.state, status.attempt, tries) == ("completed", 2, [1, 2])


async def test_executor_failed_keeps_the_reason(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    peer.release_run.set()
    peer.run_outcome = ApplicationError("tests failed", {"summary": "x"}, type=m.AGENT_FAILED)
    handle = await start_executor(client, task_queue)
    status = await final_status(handle)
    await save_history(client, handle, "executor-failed")
    assert (status.state, status.error) == ("failed", "tests failed")
    assert peer.executor_finals[-1].error == "tests failed"


async def test_executor_timed_out(client: Client, task_queue: str, peer: ScriptedPeer) -> None:
    peer.release_run.set()
    peer.run_outcome = ApplicationError(
        "the run exceeded its timeout of 1 s", type=m.AGENT_TIMED_OUT, non_retryable=True
    )
    handle = await start_executor(client, task_queue)
    status = await final_status(handle)
    await save_history(client, handle, "executor-timed-out")
    assert status.state == "timed_out"


async def test_executor_kill_while_running_stops_the_sandbox(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    handle = await start_executor(client, task_queue)
    await peer.sandbox_started.wait()
    answer = await handle.execute_update(AgentRunWorkflow.kill, m.KillRequest())
    assert answer.state == "killed"
    assert peer.sandboxes_gone == 1
    assert (await final_status(handle)).state == "killed"
    await save_history(client, handle, "executor-killed-running")


async def test_executor_refused_spawn_ends_failed(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    peer.admit_error = ApplicationError("grant", type="grant_agent_type", non_retryable=True)
    handle = await start_executor(client, task_queue)
    status = await final_status(handle)
    await save_history(client, handle, "executor-refused")
    assert status.state == "failed"
    assert m.RUN_AGENT not in peer.calls


async def test_a_spawn_admitted_through_a_database_outage_of_minutes_runs(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """The spawn is committed, then the database goes away before its workflow verifies it
    again: the admission waits the outage out (21 refused tries, about a minute and a half)
    instead of ending the run `failed` as "refused" for an outage."""
    peer.admit_outage_tries = 21
    peer.release_run.set()
    handle = await start_executor(client, task_queue)
    status = await final_status(handle)
    assert (status.state, status.error) == ("completed", None)
    assert peer.admit_outage_tries == 0


async def test_executor_large_result_completes(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    peer.release_run.set()
    peer.run_outcome = m.AgentOutcome(
        summary="big", result={"summary": "big", "diffPreview": "x" * 64_000}
    )
    handle = await start_executor(client, task_queue)
    assert (await final_status(handle)).state == "completed"
    await save_history(client, handle, "executor-large-result")


async def test_executor_try_lost_with_its_worker_is_retried(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    async def script(task: m.RunTask) -> m.AgentOutcome:
        from temporalio import activity

        if activity.info().attempt == 1:
            # The worker running it is gone: no heartbeats, no answer.
            await asyncio.sleep(30)
        return m.AgentOutcome(summary="ok", result={"summary": "ok"})

    peer.run_script = script
    handle = await start_executor(client, task_queue)
    status = await final_status(handle)
    await save_history(client, handle, "executor-lost-worker-retried")
    assert status.state == "completed"


async def test_requester_kill_after_completion_keeps_completed(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    handle = await start_requester(client, task_queue)
    await handle.signal(
        RemoteAgentWorkflow.on_event,
        m.AgentEvent(seq=2, state=m.AgentState.COMPLETED, result={"summary": "ok"}),
    )
    answer = await handle.execute_update(RemoteAgentWorkflow.kill, m.KillRequest())
    status = await final_status(handle)
    await save_history(client, handle, "requester-kill-after-completion")
    assert answer.state == "completed"
    assert (status.state, status.result) == ("completed", {"summary": "ok"})
    assert m.SEND_KILL not in peer.calls


async def test_a_spawn_whose_answers_were_lost_but_whose_events_came_is_followed_to_its_end(
    client: Client, task_queue: str, peer: ScriptedPeer
) -> None:
    """Every answer to agent.spawn is lost until the spawn deadline, but the executor's events
    say it runs the agent: the requester follows the run to its end instead of ending it
    `failed` ("spawn not delivered") while the executor runs it on."""
    peer.spawn_answer = ApplicationError("read timeout", type="peer_unreachable")
    handle = await start_requester(client, task_queue, spawn_deadline_seconds=2)
    await handle.signal(RemoteAgentWorkflow.on_event, m.AgentEvent(seq=1, state="running"))
    await asyncio.sleep(3)  # past the spawn deadline: the spawn was given up
    assert (await handle.query(RemoteAgentWorkflow.status)).state == "running"
    await handle.signal(
        RemoteAgentWorkflow.on_event,
        m.AgentEvent(seq=3, state=m.AgentState.COMPLETED, result={"summary": "ran"}),
    )
    status = await final_status(handle)
    assert (status.state, status.result) == ("completed", {"summary": "ran"})
    assert m.DELIVER_KILL not in peer.calls
