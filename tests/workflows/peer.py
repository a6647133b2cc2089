"""Test doubles of the I/O at the activity boundary, registered under the real activity names.

The workflows are the real ones, run by a real worker against the real Temporal dev server; only
what the activities would have done on the network or in the store is scripted here, so each
race (kill during spawn, kill racing completion, lost events...) can be driven step by step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.client import Client, WorkflowHandle
from temporalio.exceptions import ApplicationError

import workflows.models as m
from workflows.agent_run import AgentRunWorkflow
from workflows.remote_agent import RemoteAgentWorkflow

HISTORIES = Path(__file__).parent / "histories"
RunScript = Callable[[m.RunTask], Awaitable[m.AgentOutcome]]


class ScriptedPeer:
    """What the peer, the store and the sandbox answer, as one test scripts them."""

    def __init__(self) -> None:
        # requester side
        self.spawn_gate = asyncio.Event()
        self.spawn_gate.set()
        self.spawn_answer: m.AgentEvent | ApplicationError = m.AgentEvent(
            seq=1, state=m.AgentState.RUNNING
        )
        self.status_answer: m.AgentEvent | ApplicationError = m.AgentEvent(
            seq=1, state=m.AgentState.RUNNING
        )
        self.kill_answer: Callable[[], Awaitable[m.KillResult]] | None = None
        self.kill_error: ApplicationError | None = None
        self.requester_finals: list[m.RequesterFinal] = []
        # KillDeliveryWorkflow: each try of deliver_kill, and what the executor answers (an
        # error while it cannot be reached).
        self.deliveries: list[m.KillDelivery] = []
        self.delivery_error: ApplicationError | None = None
        # executor side
        self.admit_error: ApplicationError | None = None
        # Admissions that fail as a database away would (a retry may fix them) before one works.
        self.admit_outage_tries = 0
        self.run_script: RunScript | None = None
        self.sandbox_started = asyncio.Event()
        self.sandboxes_gone = 0
        self.release_run = asyncio.Event()
        self.run_outcome: m.AgentOutcome | ApplicationError = m.AgentOutcome(
            summary="done", result={"summary": "done"}
        )
        self.executor_finals: list[m.FinishRun] = []
        self.notified: list[m.FinishRun] = []
        self.notify_error: ApplicationError | None = None
        self.notify_gate = asyncio.Event()
        self.notify_gate.set()
        self.record_gate = asyncio.Event()
        self.record_gate.set()
        self.calls: list[str] = []
        self.status_checks = 0

    def set_status(self, event: m.AgentEvent) -> None:
        self.status_answer = event

    # --- requester side ------------------------------------------------------------------

    @activity.defn(name=m.SEND_SPAWN)
    async def send_spawn(self, inp: m.SpawnAgentInput) -> m.AgentEvent:
        self.calls.append(m.SEND_SPAWN)
        await self.spawn_gate.wait()
        if isinstance(self.spawn_answer, ApplicationError):
            raise self.spawn_answer
        return self.spawn_answer

    @activity.defn(name=m.CHECK_STATUS)
    async def check_status(self, call: m.PeerCall) -> m.AgentEvent:
        """agent.status: the peer's record as it is now."""
        self.calls.append(m.CHECK_STATUS)
        self.status_checks += 1
        answer = self.status_answer
        if isinstance(answer, ApplicationError):
            raise answer
        return answer

    @activity.defn(name=m.SEND_KILL)
    async def send_kill(self, call: m.PeerCall) -> m.KillResult:
        self.calls.append(m.SEND_KILL)
        if self.kill_error is not None:
            raise self.kill_error
        if self.kill_answer is not None:
            return await self.kill_answer()
        return m.KillResult(agent_id=call.agent_id, state=m.AgentState.KILLED, seq=99)

    @activity.defn(name=m.DELIVER_KILL)
    async def deliver_kill(self, inp: m.KillDelivery) -> m.KillResult:
        self.calls.append(m.DELIVER_KILL)
        self.deliveries.append(inp)
        if self.delivery_error is not None:
            raise self.delivery_error
        return m.KillResult(agent_id=inp.agent_id, state=m.AgentState.KILLED, seq=99)

    @activity.defn(name=m.RECORD_REQUESTER_FINAL)
    async def record_requester_final(self, final: m.RequesterFinal) -> m.RecordedFinal:
        """Kept as the store keeps it: the first final stays (each call is still listed)."""
        self.calls.append(m.RECORD_REQUESTER_FINAL)
        await self.record_gate.wait()
        self.requester_finals.append(final)
        first = next(f for f in self.requester_finals if f.agent_id == final.agent_id)
        return m.RecordedFinal(
            state=first.state, result=first.result, error=first.error, written=first is final
        )

    # --- executor side -------------------------------------------------------------------

    @activity.defn(name=m.ADMIT_RUN)
    async def admit_run(self, inp: m.AgentRunInput) -> m.RunTask:
        self.calls.append(m.ADMIT_RUN)
        if self.admit_error is not None:
            raise self.admit_error
        if self.admit_outage_tries > 0:
            self.admit_outage_tries -= 1
            raise ApplicationError("connection refused: the database is away", type="OSError")
        payload = inp.envelope["payload"]
        options = payload.get("options") or {}
        return m.RunTask(
            agent_id=payload["agentId"],
            requester_id=inp.envelope["senderId"],
            connection_id=str(uuid.uuid4()),
            task_id=payload["taskId"],
            agent_type=payload["agentType"],
            context=payload.get("context") or {},
            timeout_seconds=int(options.get("timeout", 60)),
            max_retries=int(options.get("maxRetries", 0)),
            workflow_id=m.agent_run_workflow_id(inp.envelope["senderId"], payload["agentId"]),
            heartbeat_interval=float(options.get("heartbeatInterval", 0.2)),
        )

    @activity.defn(name=m.RUN_AGENT)
    async def run_agent(self, task: m.RunTask) -> m.AgentOutcome:
        self.calls.append(m.RUN_AGENT)
        if self.run_script is not None:
            return await self.run_script(task)
        return await self.sandbox(task)

    async def sandbox(self, task: m.RunTask) -> m.AgentOutcome:
        """A run that heartbeats until released (or cancelled: a kill), then answers."""
        self.sandbox_started.set()
        try:
            while not self.release_run.is_set():
                activity.heartbeat({"turn": 1})
                try:
                    await asyncio.wait_for(self.release_run.wait(), task.heartbeat_interval)
                except TimeoutError:
                    pass
        finally:
            self.sandboxes_gone += 1
        if isinstance(self.run_outcome, ApplicationError):
            raise self.run_outcome
        return self.run_outcome

    @activity.defn(name=m.RECORD_RUN_FINAL)
    async def record_run_final(self, finish: m.FinishRun) -> m.RecordedFinal:
        """Kept as the store keeps it: the first final stays, with its sequence number."""
        self.calls.append(m.RECORD_RUN_FINAL)
        await self.record_gate.wait()  # the store is slow (or away) while it records
        self.executor_finals.append(finish)
        first = next(f for f in self.executor_finals if f.agent_id == finish.agent_id)
        return m.RecordedFinal(
            state=first.state,
            result=first.result,
            error=first.error,
            seq=11,
            written=first is finish,
        )

    @activity.defn(name=m.NOTIFY_REQUESTER)
    async def notify_requester(self, finish: m.FinishRun) -> None:
        self.calls.append(m.NOTIFY_REQUESTER)
        await self.notify_gate.wait()
        if self.notify_error is not None:
            raise self.notify_error
        self.notified.append(finish)

    def activities(self) -> list[Callable[..., Any]]:
        return [
            getattr(self, name)
            for name in dir(self)
            if hasattr(getattr(self, name), "__temporal_activity_definition")
        ]


def workflow_of(
    handle: WorkflowHandle[Any, Any],
) -> type[RemoteAgentWorkflow] | type[AgentRunWorkflow]:
    """The workflow class behind a handle, for helpers that take either side's run."""
    return RemoteAgentWorkflow if handle.id.startswith("remote-agent/") else AgentRunWorkflow


def spawn_input(agent_id: str, **overrides: Any) -> m.SpawnAgentInput:
    base = m.SpawnAgentInput(
        agent_id=agent_id,
        connection_id=str(uuid.uuid4()),
        peer_instance_id="spoke",
        peer_name="spoke",
        task_id="t-1",
        agent_type="coder",
        context={"instructions": "$ true"},
        options={"timeout": 60, "maxRetries": 0},
        spawn_deadline_seconds=30,
        peer_timeout_seconds=2.0,
        # Short: most tests want the status check soon; tests/workflows/test_messages.py sets it.
        poll_after_quiet_seconds=0.3,
    )
    return dataclasses.replace(base, **overrides)


def run_input(agent_id: str, **options: Any) -> m.AgentRunInput:
    return m.AgentRunInput(
        envelope={
            "senderId": "hub",
            "messageId": str(uuid.uuid4()),
            "payload": {
                "agentId": agent_id,
                "taskId": "t-1",
                "agentType": "coder",
                "context": {"instructions": "$ true"},
                "options": {"timeout": 60, "maxRetries": 0, **options},
            },
        },
        received_at="2026-12-01T00:00:00Z",
    )


async def save_history(client: Client, handle: WorkflowHandle[Any, Any], name: str) -> None:
    """Keep the history for the replay test when FEDAGENT_RECORD_HISTORIES names a prefix."""
    prefix = os.environ.get("FEDAGENT_RECORD_HISTORIES")
    if not prefix:
        return
    history = await client.get_workflow_handle(handle.id, run_id=handle.run_id).fetch_history()
    HISTORIES.mkdir(exist_ok=True)
    path = HISTORIES / f"{prefix}-{name}.json"
    path.write_text(json.dumps(json.loads(history.to_json()), indent=1) + "\n")
