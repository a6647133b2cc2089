"""Connections with peers (admin): the REST face of `operations.connections`."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, status

from api.deps import AdminUser, ServicesDep
from federation.models import ConnectionAccept, ConnectionCreate, ConnectionPublic, ConnectionUpdate
from federation.states import ConnectionKind
from operations import connections

router = APIRouter(prefix="/api/v1/federation/connections", tags=["connections"])


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_connection(
    body: ConnectionCreate, user: AdminUser, services: ServicesDep
) -> ConnectionPublic:
    """Ask the instance at `remoteUrl` for a connection; it stays PENDING until the peer accepts.

    The peer may ask nothing of this instance over it until `grants` (here or later) allow it.
    With `kind: "a2a"`, `remoteUrl` is an A2A agent's card URL (or its base URL) and `token`
    its bearer credentials: the connection is ACTIVE at once."""
    if body.kind == ConnectionKind.A2A:
        token = body.token.get_secret_value() if body.token else None
        return await connections.connect_a2a(services, user, str(body.remoteUrl), token)
    return await connections.create(services, user, str(body.remoteUrl), body.grants)


@router.get("")
async def list_connections(user: AdminUser, services: ServicesDep) -> list[ConnectionPublic]:
    return await connections.list_(services)


@router.get("/{connection_id}")
async def get_connection(
    connection_id: uuid.UUID, user: AdminUser, services: ServicesDep
) -> ConnectionPublic:
    return await connections.get(services, connection_id)


@router.post("/{connection_id}/accept")
async def accept_connection(
    connection_id: uuid.UUID,
    user: AdminUser,
    services: ServicesDep,
    body: ConnectionAccept | None = None,
) -> ConnectionPublic:
    """Accept a peer's request; `grants` (optional) say what the peer may ask of us."""
    return await connections.accept(services, user, connection_id, body.grants if body else None)


@router.post("/{connection_id}/reject")
async def reject_connection(
    connection_id: uuid.UUID, user: AdminUser, services: ServicesDep
) -> ConnectionPublic:
    return await connections.reject(services, user, connection_id)


@router.post("/{connection_id}/disconnect")
async def disconnect_connection(
    connection_id: uuid.UUID, user: AdminUser, services: ServicesDep
) -> ConnectionPublic:
    """End the connection here whatever happens; `peerNotified` says whether the peer heard it."""
    return await connections.disconnect(services, user, connection_id)


@router.patch("/{connection_id}")
async def update_connection(
    connection_id: uuid.UUID, body: ConnectionUpdate, user: AdminUser, services: ServicesDep
) -> ConnectionPublic:
    """Change what the peer may ask of this instance; fields left out stay as they are."""
    return await connections.update_grants(services, user, connection_id, body.grants)


@router.post("/{connection_id}/suspend")
async def suspend_connection(
    connection_id: uuid.UUID, user: AdminUser, services: ServicesDep
) -> ConnectionPublic:
    """Stop all traffic with the peer now; `peerNotified` says whether the peer heard it."""
    return await connections.suspend(services, user, connection_id)


@router.post("/{connection_id}/resume")
async def resume_connection(
    connection_id: uuid.UUID, user: AdminUser, services: ServicesDep
) -> ConnectionPublic:
    """Lift this instance's suspension; the peer hears it first (a peer that cannot be told
    keeps the connection SUSPENDED on both sides)."""
    return await connections.resume(services, user, connection_id)
