"""Runs peers started on this instance (admin): the REST face of `operations.hosted`."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import AdminUser, ServicesDep
from federation.models import AgentKillPublic, AgentPublic, Line
from federation.states import AgentState
from operations import hosted

router = APIRouter(prefix="/api/v1/federation/hosted", tags=["hosted"])
Peer = Annotated[
    Line | None, Query(max_length=200, description="The requester's name or instance id.")
]


@router.get("")
async def list_hosted(
    user: AdminUser,
    services: ServicesDep,
    peer: Peer = None,
    state: AgentState | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[AgentPublic]:
    """Runs peers started on this instance, newest first."""
    rows = await hosted.list_(services, peer=peer, state=state, limit=limit, offset=offset)
    return [AgentPublic.from_row(r) for r in rows]


@router.get("/{agent_id}")
async def get_hosted(
    agent_id: uuid.UUID, user: AdminUser, services: ServicesDep, peer: Peer = None
) -> AgentPublic:
    return AgentPublic.from_row(await hosted.get(services, agent_id, peer))


@router.post("/{agent_id}/kill")
async def kill_hosted(
    agent_id: uuid.UUID, user: AdminUser, services: ServicesDep, peer: Peer = None
) -> AgentKillPublic:
    """Stop a run a peer started here; answers once its sandbox is gone."""
    return await hosted.kill(services, user, agent_id, peer)
