"""Connections with peers (admin): initiate, accept (with grants), reject, suspend, resume,
disconnect, change grants, list and read. Every change is told to the peer by a signed message
and written to the audit log."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, status

from api.deps import AdminUser, HttpDep, IdentityDep, PoolDep, SettingsDep
from federation.connections import change_suspension, suspension_change
from federation.envelope import MessageType
from federation.errors import (
    ConnectionNotFound,
    ConnectionStateConflict,
    FederationError,
    InvalidRequest,
    PeerUnreachable,
)
from federation.identity import Identity
from federation.models import (
    ConnectionAccept,
    ConnectionCreate,
    ConnectionPublic,
    ConnectionUpdate,
    GrantsUpdate,
)
from federation.peer import fetch_card, send_signed
from federation.settings import Settings
from federation.store import repos

router = APIRouter(prefix="/api/v1/federation/connections", tags=["connections"])


async def _notify(
    http: Any,
    identity: Identity,
    settings: Settings,
    connection: dict[str, Any],
    command_type: str,
) -> None:
    await send_signed(
        http,
        identity,
        url=connection["remote_url"],
        recipient_id=connection["remote_instance_id"],
        recipient_keys=connection["remote_keys"],
        type=MessageType.CONNECT,
        command_type=command_type,
        payload={"connectionId": str(connection["connection_id"])},
        window_seconds=settings.timestamp_window,
        timeout=settings.peer_request_timeout,
    )


def _grants_or_422(update: GrantsUpdate, current: dict[str, Any] | None) -> dict[str, Any]:
    try:
        return update.apply(current).model_dump()
    except ValueError as exc:
        raise InvalidRequest(str(exc).splitlines()[0]) from None


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_connection(
    body: ConnectionCreate,
    user: AdminUser,
    pool: PoolDep,
    http: HttpDep,
    identity: IdentityDep,
    settings: SettingsDep,
) -> ConnectionPublic:
    """Ask the instance at `remoteUrl` for a connection; it stays PENDING until the peer accepts."""
    remote_url = str(body.remoteUrl).rstrip("/")
    card = await fetch_card(http, remote_url)
    if card["instanceId"] == identity.instance_id:
        raise InvalidRequest("remoteUrl is this instance itself")
    existing = await repos.connection_for_peer(pool, card["instanceId"])
    if existing is not None and existing["status"] != "DISCONNECTED":
        raise ConnectionStateConflict(
            f"a connection with {card.get('name')} is already {existing['status']}",
            connectionId=str(existing["connection_id"]),
        )
    connection_id = uuid.uuid4()
    await send_signed(
        http,
        identity,
        url=remote_url,
        recipient_id=card["instanceId"],
        recipient_keys=card["keys"],
        type=MessageType.CONNECT,
        command_type="connection.request",
        payload={
            "connectionId": str(connection_id),
            "url": identity.public_url,
            "name": identity.name,
        },
        window_seconds=settings.timestamp_window,
        timeout=settings.peer_request_timeout,
    )
    row = await repos.insert_connection(
        pool,
        connection_id=connection_id,
        remote_instance_id=card["instanceId"],
        remote_name=str(card.get("name", "")),
        remote_url=remote_url,
        remote_keys=card["keys"],
        direction="outbound",
    )
    await repos.audit(
        pool,
        actor=f"user:{user.name}",
        action="connection.request",
        connectionId=str(connection_id),
    )
    return ConnectionPublic.from_row(row)


@router.get("")
async def list_connections(user: AdminUser, pool: PoolDep) -> list[ConnectionPublic]:
    return [ConnectionPublic.from_row(r) for r in await repos.list_connections(pool)]


async def _get(pool: Any, connection_id: uuid.UUID) -> dict[str, Any]:
    row = await repos.get_connection(pool, connection_id)
    if row is None:
        raise ConnectionNotFound(f"no connection {connection_id}")
    return row


@router.get("/{connection_id}")
async def get_connection(
    connection_id: uuid.UUID, user: AdminUser, pool: PoolDep
) -> ConnectionPublic:
    return ConnectionPublic.from_row(await _get(pool, connection_id))


async def _answer(
    connection_id: uuid.UUID,
    command_type: str,
    target: str,
    user: Any,
    pool: Any,
    http: Any,
    identity: Identity,
    settings: Settings,
    grants: GrantsUpdate | None = None,
) -> ConnectionPublic:
    row = await _get(pool, connection_id)
    new_grants = _grants_or_422(grants or GrantsUpdate(), row["grants"])
    if row["direction"] != "inbound" or row["status"] != "PENDING":
        raise ConnectionStateConflict(
            f"only a PENDING request from a peer can be answered; this one is "
            f"{row['direction']} and {row['status']}"
        )
    # The peer hears it first: a peer that cannot be told keeps us PENDING, in step with it.
    await _notify(http, identity, settings, row, command_type)
    async with pool.acquire() as conn, conn.transaction():
        updated = await repos.set_connection_status(
            conn, connection_id, target, expect=("PENDING",)
        )
        if updated is None:
            raise ConnectionStateConflict("the connection changed meanwhile")
        details: dict[str, Any] = {}
        if target == "ACTIVE":
            updated = await repos.set_grants(conn, connection_id, new_grants)
            assert updated is not None
            details["grants"] = new_grants
        await repos.audit(
            conn,
            actor=f"user:{user.name}",
            action=command_type,
            connectionId=str(connection_id),
            **details,
        )
    return ConnectionPublic.from_row(updated)


@router.post("/{connection_id}/accept")
async def accept_connection(
    connection_id: uuid.UUID,
    user: AdminUser,
    pool: PoolDep,
    http: HttpDep,
    identity: IdentityDep,
    settings: SettingsDep,
    body: ConnectionAccept | None = None,
) -> ConnectionPublic:
    """Accept a peer's request; `grants` (optional) say what the peer may ask of us."""
    return await _answer(
        connection_id,
        "connection.accept",
        "ACTIVE",
        user,
        pool,
        http,
        identity,
        settings,
        grants=body.grants if body else None,
    )


@router.post("/{connection_id}/reject")
async def reject_connection(
    connection_id: uuid.UUID,
    user: AdminUser,
    pool: PoolDep,
    http: HttpDep,
    identity: IdentityDep,
    settings: SettingsDep,
) -> ConnectionPublic:
    return await _answer(
        connection_id, "connection.reject", "DISCONNECTED", user, pool, http, identity, settings
    )


@router.post("/{connection_id}/disconnect")
async def disconnect_connection(
    connection_id: uuid.UUID,
    user: AdminUser,
    pool: PoolDep,
    http: HttpDep,
    identity: IdentityDep,
    settings: SettingsDep,
) -> ConnectionPublic:
    """End the connection here whatever happens; `peerNotified` says whether the peer heard it."""
    row = await _get(pool, connection_id)
    if row["status"] == "DISCONNECTED":
        return ConnectionPublic.from_row(row, peerNotified=False)
    try:
        await _notify(http, identity, settings, row, "connection.disconnect")
        notified = True
    except (PeerUnreachable, FederationError):
        notified = False
    updated = await repos.set_connection_status(pool, connection_id, "DISCONNECTED")
    assert updated is not None
    await repos.audit(
        pool,
        actor=f"user:{user.name}",
        action="connection.disconnect",
        connectionId=str(connection_id),
        peerNotified=notified,
    )
    return ConnectionPublic.from_row(updated, peerNotified=notified)


@router.patch("/{connection_id}")
async def update_connection(
    connection_id: uuid.UUID, body: ConnectionUpdate, user: AdminUser, pool: PoolDep
) -> ConnectionPublic:
    """Change what the peer may ask of this instance; fields left out stay as they are."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT * FROM connections WHERE connection_id = $1 FOR UPDATE", connection_id
        )
        if row is None:
            raise ConnectionNotFound(f"no connection {connection_id}")
        if row["status"] == "DISCONNECTED":
            raise ConnectionStateConflict("a DISCONNECTED connection has no grants to change")
        before = dict(row["grants"] or {})
        grants = _grants_or_422(body.grants, before)
        updated = await repos.set_grants(conn, connection_id, grants)
        assert updated is not None
        await repos.audit(
            conn,
            actor=f"user:{user.name}",
            action="connection.grants",
            connectionId=str(connection_id),
            before=before,
            after=grants,
        )
    return ConnectionPublic.from_row(updated)


@router.post("/{connection_id}/suspend")
async def suspend_connection(
    connection_id: uuid.UUID,
    user: AdminUser,
    pool: PoolDep,
    http: HttpDep,
    identity: IdentityDep,
    settings: SettingsDep,
) -> ConnectionPublic:
    """Stop all traffic with the peer now; `peerNotified` says whether the peer heard it."""
    row = await _get(pool, connection_id)
    # Our side stops at once, whether or not the peer can be told.
    updated = await change_suspension(pool, row, "local", "suspend")
    try:
        await _notify(http, identity, settings, row, "connection.suspend")
        notified = True
    except FederationError:
        notified = False
    await repos.audit(
        pool,
        actor=f"user:{user.name}",
        action="connection.suspend",
        connectionId=str(connection_id),
        peerNotified=notified,
        suspendedBy=updated["suspended_by"],
    )
    return ConnectionPublic.from_row(updated, peerNotified=notified)


@router.post("/{connection_id}/resume")
async def resume_connection(
    connection_id: uuid.UUID,
    user: AdminUser,
    pool: PoolDep,
    http: HttpDep,
    identity: IdentityDep,
    settings: SettingsDep,
) -> ConnectionPublic:
    """Lift this instance's suspension; the peer hears it first (a peer that cannot be told
    keeps the connection SUSPENDED on both sides)."""
    row = await _get(pool, connection_id)
    suspension_change(row, "local", "resume")  # refuse before telling the peer anything
    await _notify(http, identity, settings, row, "connection.resume")
    updated = await change_suspension(pool, row, "local", "resume")
    await repos.audit(
        pool,
        actor=f"user:{user.name}",
        action="connection.resume",
        connectionId=str(connection_id),
        status=updated["status"],
        suspendedBy=updated["suspended_by"],
    )
    return ConnectionPublic.from_row(updated, peerNotified=True)
