"""One-off signed commands a local user sends to a peer (`agent.status`), kept with its answer.

Spawns and kills are not sent here: they go through `operations.agents`, which runs them durably.
"""

from __future__ import annotations

import uuid
from typing import Any

from federation.envelope import MessageType
from federation.errors import (
    AgentNotFound,
    ConnectionNotFound,
    FederationError,
    LocalConnectionNotActive,
    PeerRefused,
)
from federation.models import CommandCreate, CommandPublic
from federation.peer import PeerLink
from federation.states import ConnectionStatus
from federation.store import repos
from federation.trust import require_fedagent
from federation.users import User
from operations import Services


async def send(services: Services, user: User, body: CommandCreate) -> CommandPublic:
    """Send a signed command to the peer of an ACTIVE connection and keep its answer: status
    `answered` (the peer's signed reply in `response`), `refused` (the peer's problem code in
    `error`) or `failed` (the peer could not be reached or answered with something invalid)."""
    connection = await _commandable_connection(services, user, body)
    payload = body.payload.model_dump(mode="json")
    message_id = str(uuid.uuid4())
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    link = PeerLink.of(
        connection,
        http=services.http,
        identity=await services.identity(),
        settings=services.settings,
    )
    try:
        envelope, response = await link.send(
            MessageType.COMMAND, body.commandType, payload, message_id=message_id
        )
        outcome = "answered"
        await repos.record_message(
            services.pool, envelope.to_wire(), direction="out", agent_id=body.payload.agentId
        )
    except PeerRefused as err:
        outcome = "refused"
        error = {"code": err.peer_code, "status": err.peer_status, "detail": err.detail}
    except FederationError as err:
        outcome = "failed"
        error = {"code": err.code, "detail": err.detail}
    row = await _keep(
        services, user, body, connection, payload, message_id, outcome, response, error
    )
    return CommandPublic.from_row(row)


async def _commandable_connection(
    services: Services, user: User, body: CommandCreate
) -> dict[str, Any]:
    """The ACTIVE connection the command goes over, which the agent it names was spawned on."""
    connection = await repos.get_connection(services.pool, body.connectionId)
    if connection is None:
        raise ConnectionNotFound(f"no connection {body.connectionId}")
    agent = user.visible(await repos.get_requested_agent(services.pool, body.payload.agentId))
    if agent is None or agent["connection_id"] != body.connectionId:
        raise AgentNotFound(f"no agent {body.payload.agentId} on this connection")
    if connection["status"] != ConnectionStatus.ACTIVE:
        raise LocalConnectionNotActive(
            f"connection {body.connectionId} is {connection['status']}; commands need ACTIVE"
        )
    return require_fedagent(connection)


async def _keep(
    services: Services,
    user: User,
    body: CommandCreate,
    connection: dict[str, Any],
    payload: dict[str, Any],
    message_id: str,
    outcome: str,
    response: dict[str, Any] | None,
    error: dict[str, Any] | None,
) -> dict[str, Any]:
    """The command's row with its outcome, and its audit entry, in one transaction."""
    async with services.pool.acquire() as conn, conn.transaction():
        row: dict[str, Any] = await repos.insert_command(
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
    return row
