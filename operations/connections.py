"""Connections with peers (admin): ask, accept (with grants), reject, suspend, resume,
disconnect, change grants, list and read. Every change is told to the peer by a signed message
and written to the audit log."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from federation import a2a_peer
from federation.connections import change_suspension, suspension_change
from federation.envelope import MessageType
from federation.errors import (
    ConnectionNotFound,
    ConnectionStateConflict,
    FederationError,
    InvalidRequest,
    PeerNotTold,
)
from federation.keystore import default_cipher
from federation.models import ConnectionPublic, GrantsUpdate, PeerPublic
from federation.peer import fetch_card, send_signed
from federation.settings import Settings
from federation.states import ConnectionKind, ConnectionStatus
from federation.store import repos
from federation.store.first_hour import spawnable_connections
from federation.trust import SAFE_INSTANCE_ID, require_acceptable_keys
from federation.users import User
from operations import Services
from workflows.end_runs import EndConnectionRunsWorkflow
from workflows.models import EndConnectionRuns, end_runs_workflow_id

log = logging.getLogger(__name__)


async def start_ending_runs(
    temporal: Client, settings: Settings, connection: dict[str, Any]
) -> None:
    """Start the workflow that ends the runs of a connection that was suspended or
    disconnected: one per connection and change, so a change is acted on once, and a process
    that dies mid-way leaves the rest to the workflow."""
    change = f"{connection['status']}-{connection['updated_at'].timestamp():.6f}"
    connection_id = str(connection["connection_id"])
    try:
        await temporal.start_workflow(
            EndConnectionRunsWorkflow.run,
            EndConnectionRuns(connection_id=connection_id, status=str(connection["status"])),
            id=end_runs_workflow_id(connection_id, change),
            task_queue=settings.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        )
    except WorkflowAlreadyStartedError:
        pass  # this change is being acted on, or was
    except RPCError as exc:  # Temporal away: the reconciler's sweep starts it once it is back
        log.warning("ending the runs of connection %s: %s", connection_id, exc)


async def end_runs_of_ended_connections(pool: Any, temporal: Client, settings: Settings) -> None:
    """A sweep of the reconciler: a connection that ended with runs not final yet has its
    EndConnectionRunsWorkflow started (once per change: a change started already is not
    started again), e.g. when Temporal was away as the change was made."""
    if settings.on_connection_end != "kill":
        return
    for connection in await repos.ended_connections_with_open_runs(pool):
        await start_ending_runs(temporal, settings, connection)


async def _notify(
    services: Services,
    connection: dict[str, Any],
    command_type: str,
    grants: dict[str, Any] | None = None,
) -> None:
    if connection.get("kind") == ConnectionKind.A2A:
        # An A2A agent has no fedagent/1 side to tell: the change holds here.
        raise PeerNotTold("an A2A agent is not told of connection changes")
    payload: dict[str, Any] = {"connectionId": str(connection["connection_id"])}
    if grants is not None:
        payload["grants"] = grants  # what we now allow the peer: it shows them, refuses early
    await send_signed(
        services.http,
        await services.identity(),
        url=connection["remote_url"],
        recipient_id=connection["remote_instance_id"],
        recipient_keys=connection["remote_keys"],
        type=MessageType.CONNECT,
        command_type=command_type,
        payload=payload,
        window_seconds=services.settings.timestamp_window,
        timeout=services.settings.peer_request_timeout,
        max_reply_bytes=services.settings.peer_reply_max_bytes,
        connection_id=str(connection["connection_id"]),
    )


def _grants_or_422(update: GrantsUpdate, current: dict[str, Any] | None) -> dict[str, Any]:
    try:
        return update.apply(current).model_dump()
    except ValueError as exc:
        raise InvalidRequest(str(exc).splitlines()[0]) from None


# What a peer may ask of this instance over a connection this instance asked for, until its
# admin grants more (PATCH /connections/{id} or the grants of the request).
NOTHING_GRANTED: dict[str, Any] = {"commandTypes": [], "agentTypes": [], "repositories": []}


async def create(
    services: Services, user: User, remote_url: str, grants: GrantsUpdate | None = None
) -> ConnectionPublic:
    """Ask the instance at `remote_url` for a connection: PENDING until the peer accepts.

    The peer may ask nothing of this instance over it unless `grants` say so."""
    pool, settings = services.pool, services.settings
    identity = await services.identity()
    remote_url = remote_url.rstrip("/")
    granted = (
        _grants_or_422(grants, NOTHING_GRANTED) if grants is not None else dict(NOTHING_GRANTED)
    )
    card = await fetch_card(services.http, remote_url, timeout=settings.peer_request_timeout)
    if not SAFE_INSTANCE_ID.fullmatch(str(card["instanceId"])):
        raise InvalidRequest("the peer's identity card has no valid instanceId")
    if card["instanceId"] == identity.instance_id:
        raise InvalidRequest("remoteUrl is this instance itself")
    require_acceptable_keys(card["keys"])
    existing = await repos.connection_for_peer(pool, card["instanceId"])
    if existing is not None and existing["status"] != ConnectionStatus.DISCONNECTED:
        raise ConnectionStateConflict(
            f"a connection with {card.get('name')} is already {existing['status']}",
            connectionId=str(existing["connection_id"]),
        )
    connection_id = uuid.uuid4()
    await send_signed(
        services.http,
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
            "keys": identity.card()["keys"],
        },
        window_seconds=settings.timestamp_window,
        timeout=settings.peer_request_timeout,
        max_reply_bytes=settings.peer_reply_max_bytes,
        connection_id=str(connection_id),
    )
    row = await repos.insert_connection(
        pool,
        connection_id=connection_id,
        remote_instance_id=card["instanceId"],
        remote_name=str(card.get("name", "")),
        remote_url=remote_url,
        remote_keys=card["keys"],
        direction="outbound",
        grants=granted,
    )
    await repos.audit(
        pool,
        actor=user.actor,
        action="connection.request",
        connectionId=str(connection_id),
        grants=granted,
    )
    return ConnectionPublic.from_row(row)


async def connect_a2a(
    services: Services, user: User, card_url: str, token: str | None = None
) -> ConnectionPublic:
    """Add an A2A agent as a peer by its card URL: ACTIVE at once (an A2A agent has no
    handshake); spawns on it go over A2A 1.0 JSON-RPC with `token` as bearer credentials,
    kept sealed under the master key. It may ask nothing of this instance."""
    card = await a2a_peer.fetch_agent_card(services.http, card_url, services.settings)
    existing = await repos.connection_for_peer(services.pool, card.peer_id)
    if existing is not None and existing["status"] != ConnectionStatus.DISCONNECTED:
        raise ConnectionStateConflict(
            f"a connection with the A2A agent at {card.card_url} is already {existing['status']}",
            connectionId=str(existing["connection_id"]),
        )
    connection_id = uuid.uuid4()
    cipher = services.cipher or default_cipher()
    sealed = a2a_peer.seal_credentials(cipher, connection_id, token) if token else None
    row = await repos.insert_a2a_connection(
        services.pool,
        connection_id=connection_id,
        remote_instance_id=card.peer_id,
        remote_name=card.name,
        remote_url=card.card_url,
        a2a_endpoint=card.endpoint,
        credentials_sealed=sealed,
    )
    await repos.audit(
        services.pool,
        actor=user.actor,
        action="connection.a2a_add",
        connectionId=str(connection_id),
        cardUrl=card.card_url,
        endpoint=card.endpoint,
        credentials=sealed is not None,
    )
    return ConnectionPublic.from_row(row)


async def list_(services: Services) -> list[ConnectionPublic]:
    return [ConnectionPublic.from_row(r) for r in await repos.list_connections(services.pool)]


async def peers(services: Services) -> list[PeerPublic]:
    """Connections any local user may spawn over, with what each peer allows this instance."""
    return [PeerPublic.from_row(r) for r in await spawnable_connections(services.pool)]


async def peer(services: Services, connection_id: uuid.UUID) -> PeerPublic:
    row = await get_row(services, connection_id)
    if row["status"] not in (ConnectionStatus.ACTIVE, ConnectionStatus.SUSPENDED):
        raise ConnectionNotFound(f"no ACTIVE connection {connection_id}")
    return PeerPublic.from_row(row)


async def get_row(services: Services, connection_id: uuid.UUID) -> dict[str, Any]:
    row = await repos.get_connection(services.pool, connection_id)
    if row is None:
        raise ConnectionNotFound(f"no connection {connection_id}")
    return row


async def get(services: Services, connection_id: uuid.UUID) -> ConnectionPublic:
    return ConnectionPublic.from_row(await get_row(services, connection_id))


async def _answer(
    services: Services,
    user: User,
    connection_id: uuid.UUID,
    command_type: str,
    target: str,
    grants: GrantsUpdate | None = None,
) -> ConnectionPublic:
    row = await get_row(services, connection_id)
    new_grants = _grants_or_422(grants or GrantsUpdate(), row["grants"])
    if row["direction"] != "inbound" or row["status"] != ConnectionStatus.PENDING:
        raise ConnectionStateConflict(
            f"only a PENDING request from a peer can be answered; this one is "
            f"{row['direction']} and {row['status']}"
        )
    # The peer hears it first: a peer that cannot be told keeps us PENDING, in step with it.
    await _notify(
        services, row, command_type, new_grants if target == ConnectionStatus.ACTIVE else None
    )
    async with services.pool.acquire() as conn, conn.transaction():
        updated = await repos.set_connection_status(
            conn, connection_id, target, expect=(ConnectionStatus.PENDING,)
        )
        if updated is None:
            raise ConnectionStateConflict("the connection changed meanwhile")
        details: dict[str, Any] = {}
        if target == ConnectionStatus.ACTIVE:
            updated = await repos.set_grants(conn, connection_id, new_grants)
            assert updated is not None
            details["grants"] = new_grants
        await repos.audit(
            conn, actor=user.actor, action=command_type, connectionId=str(connection_id), **details
        )
    return ConnectionPublic.from_row(updated)


async def accept(
    services: Services, user: User, connection_id: uuid.UUID, grants: GrantsUpdate | None = None
) -> ConnectionPublic:
    """Accept a peer's request; `grants` (optional) say what the peer may ask of us."""
    return await _answer(
        services, user, connection_id, "connection.accept", ConnectionStatus.ACTIVE, grants
    )


async def reject(services: Services, user: User, connection_id: uuid.UUID) -> ConnectionPublic:
    return await _answer(
        services, user, connection_id, "connection.reject", ConnectionStatus.DISCONNECTED
    )


async def disconnect(services: Services, user: User, connection_id: uuid.UUID) -> ConnectionPublic:
    """End the connection here whatever happens; `peerNotified` says whether the peer heard it."""
    row = await get_row(services, connection_id)
    if row["status"] == ConnectionStatus.DISCONNECTED:
        return ConnectionPublic.from_row(row, peerNotified=False)
    try:
        await _notify(services, row, "connection.disconnect")
        notified = True
    except FederationError:
        notified = False
    updated = await repos.set_connection_status(
        services.pool, connection_id, ConnectionStatus.DISCONNECTED
    )
    assert updated is not None
    await start_ending_runs(services.temporal, services.settings, updated)
    await repos.audit(
        services.pool,
        actor=user.actor,
        action="connection.disconnect",
        connectionId=str(connection_id),
        peerNotified=notified,
    )
    return ConnectionPublic.from_row(updated, peerNotified=notified)


async def update_grants(
    services: Services, user: User, connection_id: uuid.UUID, grants: GrantsUpdate
) -> ConnectionPublic:
    """Change what the peer may ask of this instance; fields left out stay as they are."""
    async with services.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT * FROM connections WHERE connection_id = $1 FOR UPDATE", connection_id
        )
        if row is None:
            raise ConnectionNotFound(f"no connection {connection_id}")
        if row["status"] == ConnectionStatus.DISCONNECTED:
            raise ConnectionStateConflict("a DISCONNECTED connection has no grants to change")
        if row["kind"] == ConnectionKind.A2A:
            raise ConnectionStateConflict("an A2A agent may ask nothing of this instance")
        before = dict(row["grants"] or {})
        new_grants = _grants_or_422(grants, before)
        updated = await repos.set_grants(conn, connection_id, new_grants)
        assert updated is not None
        await repos.audit(
            conn,
            actor=user.actor,
            action="connection.grants",
            connectionId=str(connection_id),
            before=before,
            after=new_grants,
        )
    if updated["status"] == ConnectionStatus.PENDING:
        return ConnectionPublic.from_row(updated)  # the peer hears them when we accept
    # The peer is told so it shows them and refuses at once what we would refuse; if it cannot
    # be told now, these grants still hold here.
    try:
        await _notify(services, updated, "connection.grants_changed", new_grants)
        notified = True
    except FederationError:
        notified = False
    return ConnectionPublic.from_row(updated, peerNotified=notified)


async def suspend(services: Services, user: User, connection_id: uuid.UUID) -> ConnectionPublic:
    """Stop all traffic with the peer now; `peerNotified` says whether the peer heard it."""
    row = await get_row(services, connection_id)
    # Our side stops at once, whether or not the peer can be told.
    updated = await change_suspension(services.pool, row, "local", "suspend")
    await start_ending_runs(services.temporal, services.settings, updated)
    try:
        await _notify(services, row, "connection.suspend")
        notified = True
    except FederationError:
        notified = False
    await repos.audit(
        services.pool,
        actor=user.actor,
        action="connection.suspend",
        connectionId=str(connection_id),
        peerNotified=notified,
        suspendedBy=updated["suspended_by"],
    )
    return ConnectionPublic.from_row(updated, peerNotified=notified)


async def resume(services: Services, user: User, connection_id: uuid.UUID) -> ConnectionPublic:
    """Lift this instance's suspension; the peer hears it first (a peer that cannot be told
    keeps the connection SUSPENDED on both sides)."""
    row = await get_row(services, connection_id)
    suspension_change(row, "local", "resume")  # refuse before telling the peer anything
    notified = row["kind"] != ConnectionKind.A2A
    if notified:
        await _notify(services, row, "connection.resume")
    updated = await change_suspension(services.pool, row, "local", "resume")
    await repos.audit(
        services.pool,
        actor=user.actor,
        action="connection.resume",
        connectionId=str(connection_id),
        status=updated["status"],
        suspendedBy=updated["suspended_by"],
    )
    return ConnectionPublic.from_row(updated, peerNotified=notified)
