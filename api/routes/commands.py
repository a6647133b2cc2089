"""One-off signed commands a local user sends to a peer, kept with the peer's answer.

Only commands that need no workflow go here (`agent.status`); spawns and kills go through
/agents, which run them durably. A member may query the agents of its own workspace only and
sees the commands of its own workspace only.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, status

from api.deps import CurrentUser, PoolDep, ServicesDep
from federation.errors import CommandNotFound
from federation.models import CommandCreate, CommandPublic
from federation.store import repos
from operations import commands

router = APIRouter(prefix="/api/v1/federation", tags=["commands"])


@router.post("/command", status_code=status.HTTP_201_CREATED)
async def send_command(
    body: CommandCreate, user: CurrentUser, services: ServicesDep
) -> CommandPublic:
    """Send a signed command to the peer of an ACTIVE connection and keep its answer: status
    `answered` (the peer's signed reply in `response`), `refused` (the peer's problem code in
    `error`) or `failed` (the peer could not be reached or answered with something invalid)."""
    return await commands.send(services, user, body)


@router.get("/commands")
async def list_commands(
    user: CurrentUser,
    pool: PoolDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> list[CommandPublic]:
    rows = await repos.list_commands(
        pool, workspace=None if user.is_admin else user.workspace, limit=limit, offset=offset
    )
    return [CommandPublic.from_row(r) for r in rows]


@router.get("/commands/{command_id}")
async def get_command(command_id: uuid.UUID, user: CurrentUser, pool: PoolDep) -> CommandPublic:
    row = user.visible(await repos.get_command(pool, command_id))
    if row is None:
        raise CommandNotFound(f"no command {command_id}")
    return CommandPublic.from_row(row)
