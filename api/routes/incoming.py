"""Public endpoints for peers: every request is a signed envelope, every answer a signed RESPONSE.

A refused message gets problem+json with its own code, is written to the audit log, and
leaves nothing else behind: the checks run in one transaction that a refusal rolls back
(`api.inbound`). What each message does is in `operations.peer_connect`,
`operations.peer_commands` and `operations.peer_events`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends

from api.deps import ServicesDep
from api.inbound import InboundDep, StrangerGateDep, stranger_request
from federation import tracing
from federation.envelope import Envelope, MessageType, sign_envelope
from federation.identity import Identity
from operations.peer_commands import admit_command
from operations.peer_connect import admit_connect
from operations.peer_events import admit_event

router = APIRouter(
    prefix="/api/v1/federation/incoming",
    tags=["federation (peers)"],
    dependencies=[Depends(tracing.ingress_spans)],
)


def _reply(identity: Identity, request: Envelope, payload: dict[str, Any]) -> dict[str, Any]:
    return sign_envelope(
        identity.signing_key,
        type=MessageType.RESPONSE,
        sender_id=identity.instance_id,
        recipient_id=request.senderId,
        payload=payload,
        command_type=request.commandType,
        correlation_id=request.messageId,
    ).to_wire()


@router.post("/connect")
async def incoming_connect(
    inbound: InboundDep, gate: StrangerGateDep, services: ServicesDep
) -> dict[str, Any]:
    body = inbound.body
    async with inbound.refusals():
        stranger = None
        if isinstance(body, dict) and body.get("commandType") == "connection.request":
            stranger = await stranger_request(inbound, gate)
        keys = stranger.card["keys"] if stranger else None
        async with inbound.opened(MessageType.CONNECT, sender_keys=keys) as message:
            answer = await admit_connect(
                services, message.conn, message.envelope, message.connection, stranger
            )
        return _reply(inbound.identity, message.envelope, await answer())


@router.post("/command")
async def incoming_command(inbound: InboundDep, services: ServicesDep) -> dict[str, Any]:
    received_at = datetime.now(UTC)
    async with inbound.verified(MessageType.COMMAND, now=received_at) as message:
        answer = await admit_command(
            services,
            message.conn,
            message.envelope,
            message.connection,
            received_at=received_at,
            offered_agent_types=inbound.identity.capabilities.get("agentTypes"),
        )
    return _reply(inbound.identity, message.envelope, await answer())


@router.post("/event")
async def incoming_event(inbound: InboundDep, services: ServicesDep) -> dict[str, Any]:
    async with inbound.verified(MessageType.EVENT) as message:
        answer = await admit_event(services, message.conn, message.envelope, message.connection)
    return _reply(inbound.identity, message.envelope, await answer())
