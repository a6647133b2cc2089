"""What an executor tells this requester of a run it spawned there: state events and transcripts.

Like the commands (`operations.peer_commands`), an event is admitted inside the transaction that
verified it and answered once that transaction has committed.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from activities.federation import kill_settlement
from federation.envelope import Envelope
from federation.errors import AgentEnded, AgentNotFound
from federation.models import AgentEventPayload, TranscriptEventPayload, payload_of
from federation.states import TERMINAL_STATES
from federation.store import conversations, repos
from federation.transcripts import reported_total
from federation.trust import require_active_or_ending
from operations import Services
from operations.peer_commands import Answer
from workflows.models import AgentEvent, KillResult, remote_agent_workflow_id
from workflows.remote_agent import RemoteAgentWorkflow


async def admit_event(
    services: Services,
    conn: asyncpg.Connection,
    envelope: Envelope,
    connection: dict[str, Any] | None,
) -> Answer:
    """Check a verified EVENT is about a run this sender has of us, and apply it."""
    if envelope.commandType == "agent.transcript":
        transcript = payload_of(TranscriptEventPayload, envelope)
        await _requested_run(conn, envelope, connection, transcript.agentId, ending=False)
        return _transcript_answer(services, transcript)
    event = payload_of(AgentEventPayload, envelope)
    # An ended connection still brings the final state of a run it had.
    row = await _requested_run(
        conn, envelope, connection, event.agentId, ending=event.state in TERMINAL_STATES
    )
    applied = await repos.apply_requester_update(
        conn,
        event.agentId,
        seq=event.seq,
        state=event.state,
        progress=event.progress,
        result=event.result,
        error=event.error,
        attempt=event.attempt,
    )
    if not applied and event.state in TERMINAL_STATES:
        # This side ended the run without the executor's word and may owe it a kill (recorded
        # after `row` was read, maybe: the settle looks at the row as it is now, and changes
        # only a kill still pending); the executor's own final is its word: it settles the kill
        # (a run that had ended there on its own is recorded as it ended), even if no kill can
        # reach the executor.
        said = KillResult(
            agent_id=str(event.agentId),
            state=event.state,
            seq=event.seq,
            result=event.result,
            error=event.error,
        )
        await repos.settle_kill_delivery(conn, event.agentId, **kill_settlement(said))

    async def answer() -> dict[str, Any]:
        if applied:
            _pull_if_behind(services, event.agentId, event.progress, event.result)
        if applied and event.state != row["state"]:
            await _wake_workflow(services, event)
        return {"agentId": str(event.agentId), "applied": applied}

    return answer


async def _requested_run(
    conn: asyncpg.Connection,
    envelope: Envelope,
    connection: dict[str, Any] | None,
    agent_id: uuid.UUID,
    *,
    ending: bool,
) -> dict[str, Any]:
    live = require_active_or_ending(connection, ending=ending)
    row = await repos.get_requested_agent(conn, agent_id)
    # Runs belong to the connection they were asked over, not to a reused instanceId.
    if (
        row is None
        or row["peer_instance_id"] != envelope.senderId
        or row["connection_id"] != live["connection_id"]
    ):
        raise AgentNotFound(f"no agent {agent_id} was spawned on this peer")
    if envelope.commandType == "agent.transcript" and row["state"] in TERMINAL_STATES:
        # What is missing then is pulled (up to the count the final reported).
        raise AgentEnded(f"agent {agent_id} is {row['state']}: its transcript takes no more events")
    return row


def _transcript_answer(services: Services, event: TranscriptEventPayload) -> Answer:
    async def answer() -> dict[str, Any]:
        """Keep the entries that continue the stored transcript; pull when some are missing."""
        received = await conversations.store_received(
            services.pool,
            event.agentId,
            [e.kept() for e in event.entries],
            max_entries=services.settings.transcript_max_entries,
            max_bytes=services.settings.transcript_limit,
        )
        if received.gap:
            services.transcripts.kick(event.agentId)
        return {"agentId": str(event.agentId), "stored": received.stored, "full": received.full}

    return answer


async def _wake_workflow(services: Services, event: AgentEventPayload) -> None:
    """Only state changes wake the requester's workflow; progress lives in the projection."""
    handle = services.temporal.get_workflow_handle(remote_agent_workflow_id(str(event.agentId)))
    try:
        await handle.signal(
            RemoteAgentWorkflow.on_event,
            AgentEvent(
                seq=event.seq,
                state=event.state,
                progress=event.progress,
                result=event.result,
                error=event.error,
                attempt=event.attempt,
            ),
        )
    except Exception:  # noqa: BLE001 - a closed workflow needs no more news
        pass


def _pull_if_behind(services: Services, agent_id: uuid.UUID, progress: Any, result: Any) -> None:
    total = reported_total({"progress": progress, "result": result})
    if total:
        # While the run goes on the entries may simply not have arrived yet: look again later.
        delay = 0.0 if result else 2.0
        services.transcripts.kick_if_behind(agent_id, total, delay=delay)
