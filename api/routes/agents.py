"""Spawn, read and kill agents on peers (the requester's side)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, status
from fastapi.responses import StreamingResponse

from api.deps import CurrentUser, ServicesDep
from api.event_stream import event_stream
from federation.models import (
    AgentKillPublic,
    AgentPublic,
    AgentSpawnAccepted,
    AgentSpawnCreate,
    AgentType,
    Line,
)
from federation.states import AgentState
from operations import agents

router = APIRouter(prefix="/api/v1/federation/agents", tags=["agents"])


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
    `Last-Event-ID` resumes after it, with no entry missed or repeated. An API token holds
    at most `FEDAGENT_SSE_MAX_STREAMS_PER_TOKEN` streams (429 `too_many_streams`); a stream
    ends when its token is revoked or expires.
    """
    return await event_stream(services, user, agent_id, last_event_id)
