"""Spawn, read and kill agents on peers (the requester's side)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, status
from fastapi.responses import StreamingResponse
from temporalio.client import WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from api.deps import CurrentUser, PoolDep, TemporalDep, User
from api.spawner import SpawnStarter
from federation import tracing
from federation.errors import (
    AgentIdConflict,
    AgentNotFound,
    ConnectionNotFound,
    InvalidRequest,
    KillNotDelivered,
    LocalConnectionNotActive,
)
from federation.models import (
    AgentKillPublic,
    AgentPublic,
    AgentSpawnAccepted,
    AgentSpawnCreate,
    AgentState,
    AgentType,
)
from federation.store import conversations, repos
from workflows.models import (
    KillRequest,
    remote_agent_workflow_id,
)

router = APIRouter(prefix="/api/v1/federation/agents", tags=["agents"])
SSE_POLL_SECONDS = 0.25
SSE_KEEPALIVE_SECONDS = 15.0
# Bits of an SSE event id that number transcript entries (the rest is the agent's log id).
CURSOR_BITS = 20


def spawner(request: Request) -> SpawnStarter:
    starter: SpawnStarter = request.app.state.spawner
    return starter


@router.post("/spawn", status_code=status.HTTP_202_ACCEPTED)
async def spawn_agent(
    body: AgentSpawnCreate,
    request: Request,
    user: CurrentUser,
    pool: PoolDep,
) -> AgentSpawnAccepted:
    """Spawn an agent on the peer of an ACTIVE connection; the same agentId runs once."""
    agent_id = body.agentId or uuid.uuid4()
    workflow_id = remote_agent_workflow_id(str(agent_id))
    # The run's trace: the caller's if it sent a valid `traceparent`, else a new one.
    incoming_trace = request.headers.get("traceparent", "")
    if tracing.valid(incoming_trace):
        traceparent = tracing.child(incoming_trace)
    else:
        traceparent = tracing.new_traceparent()
    tracing.bind(traceparent)
    connection = await repos.get_connection(pool, body.connectionId)
    if connection is None:
        raise ConnectionNotFound(f"no connection {body.connectionId}")
    if connection["status"] != "ACTIVE":
        raise LocalConnectionNotActive(
            f"connection {body.connectionId} is {connection['status']}; spawn needs ACTIVE"
        )
    context = body.context.model_dump()
    options = body.options.model_dump()
    async with pool.acquire() as conn, conn.transaction():
        inserted = await repos.insert_agent(
            conn,
            agent_id=agent_id,
            role="requester",
            connection_id=body.connectionId,
            peer_instance_id=connection["remote_instance_id"],
            workspace=user.workspace,
            task_id=body.taskId,
            agent_type=body.agentType,
            context=context,
            options=options,
            workflow_id=workflow_id,
            state="spawning",
            workflow_started=False,
            traceparent=traceparent,
        )
        if inserted:
            await repos.add_agent_event(conn, agent_id, seq=0, state="spawning")
        else:
            existing = await repos.get_requested_agent(conn, agent_id)
            same = existing is not None and (
                existing["connection_id"] == body.connectionId
                and existing["task_id"] == body.taskId
                and existing["agent_type"] == body.agentType
                and existing["context"] == context
                and existing["options"] == options
            )
            if not same or user.visible(existing) is None:
                raise AgentIdConflict(f"agentId {agent_id} is already used by another spawn")
            assert existing is not None
            return AgentSpawnAccepted(
                agentId=agent_id, state=existing["state"], workflowId=workflow_id
            )

        await repos.audit(
            conn,
            actor=f"user:{user.name}",
            action="agent.spawn",
            agentId=str(agent_id),
            connectionId=str(body.connectionId),
        )
        row = await repos.get_requested_agent(conn, agent_id)
        assert row is not None
    # Committed: the outbox makes sure the workflow starts; don't make the caller wait for it.
    spawner(request).kick(row)
    return AgentSpawnAccepted(agentId=agent_id, state="spawning", workflowId=workflow_id)


@router.get("")
async def list_agents(
    user: CurrentUser,
    pool: PoolDep,
    state: AgentState | None = None,
    connection_id: Annotated[uuid.UUID | None, Query(alias="connectionId")] = None,
    agent_type: Annotated[AgentType | None, Query(alias="agentType")] = None,
    task_id: Annotated[str | None, Query(alias="taskId", max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[AgentPublic]:
    """Agents this instance spawned on peers, newest first; members see their workspace only."""
    rows = await repos.list_agents(
        pool,
        role="requester",
        workspace=None if user.is_admin else user.workspace,
        state=state,
        connection_id=connection_id,
        agent_type=agent_type,
        task_id=task_id,
        limit=limit,
        offset=offset,
    )
    return [AgentPublic.from_row(r) for r in rows]


async def _get(pool: Any, user: User, agent_id: uuid.UUID) -> dict[str, Any]:
    row = user.visible(await repos.get_requested_agent(pool, agent_id))
    if row is None:
        raise AgentNotFound(f"no agent {agent_id}")
    return row


@router.get("/{agent_id}")
async def get_agent(agent_id: uuid.UUID, user: CurrentUser, pool: PoolDep) -> AgentPublic:
    return AgentPublic.from_row(await _get(pool, user, agent_id))


@router.post("/{agent_id}/kill")
async def kill_agent(
    agent_id: uuid.UUID,
    request: Request,
    user: CurrentUser,
    pool: PoolDep,
    temporal: TemporalDep,
) -> AgentKillPublic:
    """Answers once the remote sandbox is gone; a finished agent keeps its final state."""
    row = await _get(pool, user, agent_id)
    if row["state"] not in repos.TERMINAL_STATES:
        if not row["workflow_started"]:
            await spawner(request).start_workflow(row)
        handle = temporal.get_workflow_handle(row["workflow_id"])
        try:
            await handle.execute_update("kill", KillRequest(), result_type=dict)
        except WorkflowUpdateFailedError as exc:
            row = await _get(pool, user, agent_id)
            if row["state"] not in repos.TERMINAL_STATES:
                cause = exc.cause.__cause__ or exc.cause
                raise KillNotDelivered(
                    f"the kill did not reach the executor: {cause}", state=row["state"]
                ) from None
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
        await repos.audit(
            pool, actor=f"user:{user.name}", action="agent.kill", agentId=str(agent_id)
        )
        row = await _get(pool, user, agent_id)
    return AgentKillPublic(agentId=agent_id, state=row["state"])


def _sse(event: dict[str, Any], agent_id: uuid.UUID, event_id: int) -> str:
    data = {
        "agentId": str(agent_id),
        "seq": event["seq"],
        "state": event["state"],
        "progress": event["progress"],
        "error": event["error"],
        "attempt": event["attempt"],
        "at": event["at"].isoformat(),
    }
    kind = "state" if event["state"] in repos.TERMINAL_STATES else "progress"
    return f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"


def _sse_transcript(entry: dict[str, Any], agent_id: uuid.UUID, event_id: int) -> str:
    data = {"agentId": str(agent_id), **entry}
    return f"id: {event_id}\nevent: transcript\ndata: {json.dumps(data)}\n\n"


def _when(item: dict[str, Any]) -> datetime:
    at = item.get("at")
    if isinstance(at, datetime):
        return at
    try:
        return datetime.fromisoformat(str(at))
    except ValueError:
        return datetime.max.replace(tzinfo=UTC)


@router.get(
    "/{agent_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def agent_events(
    agent_id: uuid.UUID,
    request: Request,
    user: CurrentUser,
    pool: PoolDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    """Server-Sent Events of the agent's state, progress and transcript until it ends.

    Each event's `id` is one cursor over this instance's log of the agent and its transcript
    (`log id << 20 | transcript entry number`), increasing along the stream; reconnecting with
    `Last-Event-ID` resumes after it, with no entry missed or repeated.
    """
    await _get(pool, user, agent_id)
    try:
        after = int(last_event_id) if last_event_id else 0
        if after < 0:
            raise ValueError
    except ValueError:
        raise InvalidRequest("Last-Event-ID must be an event id from this stream") from None
    transcripts = request.app.state.transcripts

    async def stream() -> AsyncIterator[str]:
        cursor, entry_no = after >> CURSOR_BITS, after & ((1 << CURSOR_BITS) - 1)
        idle = 0.0
        yield "retry: 1000\n\n"
        while True:
            entries = await conversations.received_after(pool, agent_id, entry_no)
            events = await repos.agent_events_after(pool, agent_id, cursor)
            final = next((e for e in events if e["state"] in repos.TERMINAL_STATES), None)
            if final is not None:
                # Everything the run said comes before its final state.
                events = events[: events.index(final) + 1]
                row = await repos.get_requested_agent(pool, agent_id)
                await transcripts.complete(agent_id, row)
                entries = await conversations.received_after(pool, agent_id, entry_no, 100_000)
            emitted = bool(entries or events)
            while entries or events:
                take_entry = bool(entries) and (
                    not events or events[0] is final or _when(entries[0]) <= _when(events[0])
                )
                if take_entry:
                    entry = entries.pop(0)
                    entry_no = int(entry["seq"])
                    yield _sse_transcript(entry, agent_id, cursor << CURSOR_BITS | entry_no)
                    continue
                event = events.pop(0)
                cursor = event["id"]
                yield _sse(event, agent_id, cursor << CURSOR_BITS | entry_no)
                if event is final:
                    return
            if not emitted:
                row = await repos.get_requested_agent(pool, agent_id)
                if row is not None and row["state"] in repos.TERMINAL_STATES:
                    return  # resumed after the final event: nothing more will come
                await asyncio.sleep(SSE_POLL_SECONDS)
                idle += SSE_POLL_SECONDS
                if idle >= SSE_KEEPALIVE_SECONDS:
                    idle = 0.0
                    yield ": keep-alive\n\n"
            else:
                idle = 0.0

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
