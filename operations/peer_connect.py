"""What a peer may change of its connection: a stranger's request, or a change of a live one.

Like the commands (`operations.peer_commands`), a CONNECT is admitted inside the transaction that
verified it and answered once that transaction has committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from federation.connections import apply_peer_change
from federation.envelope import Envelope
from federation.errors import (
    ConnectionStateConflict,
    TooManyPendingForHost,
    TooManyPendingFromSource,
    TooManyPendingRequests,
)
from federation.models import ConnectChangePayload, ConnectRequestPayload, payload_of
from federation.settings import Settings
from federation.states import ConnectionStatus
from federation.store import pending, repos
from operations import Services
from operations.connections import start_ending_runs
from operations.peer_commands import Answer


@dataclass(frozen=True)
class StrangerRequest:
    """A stranger's verified connection.request, the card read from its URL, and where the
    request came from (`source_key` of the sender) and which host it named."""

    payload: ConnectRequestPayload
    card: dict[str, Any]
    source: str
    host: str


async def expire_pending_requests(db: Any, settings: Settings) -> None:
    """End the connection requests nobody answered within FEDAGENT_PENDING_REQUEST_TTL."""
    for row in await pending.expire(db, settings.pending_request_ttl):
        await repos.audit(
            db,
            actor="instance",
            action="connection.request_expired",
            connectionId=str(row["connection_id"]),
            peer=row["remote_instance_id"],
        )


async def check_waiting(db: Any, settings: Settings, source: str, host: str) -> None:
    """Anyone can mint a key and a card: without caps, strangers fill the admin's list."""
    now = await pending.waiting(db, source=source, host=host)
    if now.total >= settings.max_pending_requests:
        raise TooManyPendingRequests(
            f"{now.total} connection requests already wait for this instance's admin;"
            " try again later"
        )
    if now.from_source >= settings.max_pending_per_source:
        raise TooManyPendingFromSource(
            f"{now.from_source} connection requests from this address already wait"
        )
    if now.for_host >= settings.max_pending_per_host:
        raise TooManyPendingForHost(
            f"{now.for_host} connection requests naming this host already wait"
        )


async def admit_connect(
    services: Services,
    conn: asyncpg.Connection,
    envelope: Envelope,
    connection: dict[str, Any] | None,
    stranger: StrangerRequest | None,
) -> Answer:
    """Record a stranger's request, or apply a peer's change to the live connection."""
    ended: list[dict[str, Any]] = []  # the connection, if this change ended it
    if stranger is not None:
        row = await _insert_request(conn, services.settings, stranger, envelope.senderId)
    else:
        change = payload_of(ConnectChangePayload, envelope)
        assert connection is not None
        if connection["connection_id"] != change.connectionId:
            raise ConnectionStateConflict("connectionId does not match the live connection")
        row = await apply_peer_change(
            conn, connection, envelope.commandType, change.grants, on_end=ended.append
        )
    await repos.record_message(conn, envelope.to_wire(), direction="in")
    await repos.audit(
        conn,
        actor=f"peer:{envelope.senderId}",
        action=str(envelope.commandType),
        connectionId=str(row["connection_id"]),
        status=row["status"],
        suspendedBy=row.get("suspended_by"),
    )

    async def answer() -> dict[str, Any]:
        for gone in ended:  # committed: its runs end, durably, before the peer hears back
            await start_ending_runs(services.temporal, services.settings, gone)
        return {"connectionId": str(row["connection_id"]), "status": row["status"]}

    return answer


async def _insert_request(
    conn: asyncpg.Connection, settings: Settings, stranger: StrangerRequest, sender: str
) -> dict[str, Any]:
    existing = await repos.connection_for_peer(conn, sender)
    if existing is not None and existing["status"] != ConnectionStatus.DISCONNECTED:
        raise ConnectionStateConflict(
            f"a connection with this peer is already {existing['status']}"
        )
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('fedagent:pending'))")
    await check_waiting(conn, settings, stranger.source, stranger.host)
    card, payload = stranger.card, stranger.payload
    row = await repos.insert_connection(
        conn,
        connection_id=payload.connectionId,
        remote_instance_id=card["instanceId"],
        remote_name=str(card.get("name") or payload.name),
        remote_url=str(card.get("url") or payload.url),
        remote_keys=card["keys"],
        direction="inbound",
    )
    await pending.remember_origin(
        conn, payload.connectionId, source=stranger.source, host=stranger.host
    )
    return row
