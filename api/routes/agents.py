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

from api.deps import CurrentUser, ServicesDep
from federation.errors import InvalidRequest
from federation.models import (
    AgentKillPublic,
    AgentPublic,
    AgentSpawnAccepted,
    AgentSpawnCreate,
    AgentState,
    AgentType,
    Line,
)
from federation.store import conversations, repos
from federation.users import User
from operations import Services, agents

router = APIRouter(prefix="/api/v1/federation/agents", tags=["agents"])
SSE_POLL_SECONDS = 0.25
SSE_KEEPALIVE_SECONDS = 15.0
# Bits of an SSE event id that number transcript entries (the rest is the agent's log id).
CURSOR_BITS = 20


@router.post("/spawn", status_code=status.HTTP_202_ACCEPTED)
async def spawn_agent(
    body: AgentSpawnCreate, request: Request, user: CurrentUser, services: ServicesDep
) -> AgentSpawnAccepted:
    """Spawn an agent on the peer of an ACTIVE connection; the same agentId runs once."""
    # The run's trace: the caller's if it sent a valid `traceparent`, else a new one.
    return await agents.spawn(
        services, user, body, traceparent=request.headers.get("traceparent", "")
    )


@router.get("")
async def list_agents(
    user: CurrentUser,
    services: ServicesDep,
    state: AgentState | None = None,
    connection_id: Annotated[uuid.UUID | None, Query(alias="connectionId")] = None,
    agent_type: Annotated[AgentType | None, Query(alias="agentType")] = None,
    task_id: Annotated[Line | None, Query(alias="taskId", max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> list[AgentPublic]:
    """Agents this instance spawned on peers, newest first; members see their workspace only."""
    rows = await agents.list_(
        services,
        user,
        state=state,
        connection_id=connection_id,
        agent_type=agent_type,
        task_id=task_id,
        limit=limit,
        offset=offset,
    )
    return [AgentPublic.from_row(r) for r in rows]


@router.get("/{agent_id}")
async def get_agent(agent_id: uuid.UUID, user: CurrentUser, services: ServicesDep) -> AgentPublic:
    return AgentPublic.from_row(await agents.get(services, user, agent_id))


@router.post("/{agent_id}/kill")
async def kill_agent(
    agent_id: uuid.UUID, user: CurrentUser, services: ServicesDep
) -> AgentKillPublic:
    """Answers once the remote sandbox is gone; a finished agent keeps its final state."""
    return await agents.kill(services, user, agent_id)


def _sse(event: dict[str, Any], agent_id: uuid.UUID, event_id: int, kind: str) -> str:
    data = {
        "agentId": str(agent_id),
        "seq": event["seq"],
        "state": event["state"],
        "progress": event["progress"],
        "error": event["error"],
        "attempt": event["attempt"],
        "at": event["at"].isoformat(),
    }
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
    user: CurrentUser,
    services: ServicesDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    """Server-Sent Events of the agent's state, progress and transcript until it ends.

    Each event's `id` is one cursor over this instance's log of the agent and its transcript
    (`log id << 20 | transcript entry number`), increasing along the stream; reconnecting with
    `Last-Event-ID` resumes after it, with no entry missed or repeated.
    """
    return await event_stream(services, user, agent_id, last_event_id)


async def event_stream(
    services: Services, user: User, agent_id: uuid.UUID, last_event_id: str | None
) -> StreamingResponse:
    """The agent's event stream as this route serves it (the console's live pages use it too,
    authenticated by their cookie)."""
    await agents.get(services, user, agent_id)
    pool = services.pool
    try:
        after = int(last_event_id) if last_event_id else 0
        if after < 0:
            raise ValueError
    except ValueError:
        raise InvalidRequest("Last-Event-ID must be an event id from this stream") from None
    # Pulls what events did not bring before the final state goes out.
    transcripts = services.transcripts

    async def stream() -> AsyncIterator[str]:
        cursor, entry_no = after >> CURSOR_BITS, after & ((1 << CURSOR_BITS) - 1)
        # `event: state` for each change of state, `progress` for news within one state.
        seen = await repos.agent_events_after(pool, agent_id, cursor - 1) if cursor else []
        last_state = seen[0]["state"] if seen and seen[0]["id"] == cursor else None
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
                kind = "progress" if event["state"] == last_state else "state"
                last_state = event["state"]
                yield _sse(event, agent_id, cursor << CURSOR_BITS | entry_no, kind)
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
