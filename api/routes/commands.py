"""One-off signed commands a local user sends to a peer, kept with the peer's answer.

Only commands that need no workflow go here (`agent.status`); spawns and kills go through
/agents, which run them durably. A member may query the agents of its own workspace only and
sees the commands of its own workspace only.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, status

from api.deps import CurrentUser, HttpDep, IdentityDep, PoolDep, SettingsDep
from federation.envelope import MessageType
from federation.errors import (
    AgentNotFound,
    CommandNotFound,
    ConnectionNotFound,
    FederationError,
    LocalConnectionNotActive,
    PeerRefused,
)
from federation.models import CommandCreate, CommandPublic
from federation.peer import send_signed
from federation.states import ConnectionStatus
from federation.store import repos

router = APIRouter(prefix="/api/v1/federation", tags=["commands"])


@router.post("/command", status_code=status.HTTP_201_CREATED)
async def send_command(
    body: CommandCreate,
    user: CurrentUser,
    pool: PoolDep,
    http: HttpDep,
    identity: IdentityDep,
    settings: SettingsDep,
) -> CommandPublic:
    """Send a signed command to the peer of an ACTIVE connection and keep its answer: status
    `answered` (the peer's signed reply in `response`), `refused` (the peer's problem code in
    `error`) or `failed` (the peer could not be reached or answered with something invalid)."""
    connection = await repos.get_connection(pool, body.connectionId)
    if connection is None:
        raise ConnectionNotFound(f"no connection {body.connectionId}")
    agent = user.visible(await repos.get_requested_agent(pool, body.payload.agentId))
    if agent is None or agent["connection_id"] != body.connectionId:
        raise AgentNotFound(f"no agent {body.payload.agentId} on this connection")
    if connection["status"] != ConnectionStatus.ACTIVE:
        raise LocalConnectionNotActive(
            f"connection {body.connectionId} is {connection['status']}; commands need ACTIVE"
        )
    payload = body.payload.model_dump(mode="json")
    message_id = str(uuid.uuid4())
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    try:
        envelope, response = await send_signed(
            http,
            identity,
            url=connection["remote_url"],
            recipient_id=connection["remote_instance_id"],
            recipient_keys=connection["remote_keys"],
            type=MessageType.COMMAND,
            command_type=body.commandType,
            payload=payload,
            window_seconds=settings.timestamp_window,
            timeout=settings.peer_request_timeout,
            message_id=message_id,
        )
        outcome = "answered"
        await repos.record_message(
            pool, envelope.to_wire(), direction="out", agent_id=body.payload.agentId
        )
    except PeerRefused as err:
        outcome = "refused"
        error = {"code": err.peer_code, "status": err.peer_status, "detail": err.detail}
    except FederationError as err:
        outcome = "failed"
        error = {"code": err.code, "detail": err.detail}
    async with pool.acquire() as conn, conn.transaction():
        row = await repos.insert_command(
            conn,
            command_id=uuid.uuid4(),
            workspace=user.workspace,
            actor=f"user:{user.name}",
            connection_id=body.connectionId,
            peer_instance_id=connection["remote_instance_id"],
            command_type=body.commandType,
            payload=payload,
            message_id=message_id,
            status=outcome,
            response=response,
            error=error,
        )
        await repos.audit(
            conn,
            actor=f"user:{user.name}",
            action=f"command.{body.commandType}",
            outcome="ok" if outcome == "answered" else outcome,
            commandId=str(row["command_id"]),
            connectionId=str(body.connectionId),
            agentId=str(body.payload.agentId),
            messageId=message_id,
        )
    return CommandPublic.from_row(row)


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
