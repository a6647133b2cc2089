"""Store code for what a newcomer needs in the first hour: the peer's grants as the peer last
told them (connections.peer_grants), the connections a member may spawn over, and the runs
peers started on this instance (the executor's records)."""

from __future__ import annotations

import uuid
from typing import Any

from federation.store.repos import PEER_KIND, Executor


async def set_peer_grants(
    db: Executor, connection_id: uuid.UUID, grants: dict[str, Any]
) -> dict[str, Any] | None:
    """Store what the peer allows this instance over the connection; returns the new row."""
    row = await db.fetchrow(
        "UPDATE connections SET peer_grants = $2, updated_at = now()"
        " WHERE connection_id = $1 RETURNING *",
        connection_id,
        grants,
    )
    return dict(row) if row is not None else None


async def spawnable_connections(db: Executor) -> list[dict[str, Any]]:
    """Connections a local user may name in a spawn (not DISCONNECTED, not a PENDING request)."""
    rows = await db.fetch(
        "SELECT * FROM connections WHERE status IN ('ACTIVE', 'SUSPENDED')"
        " ORDER BY remote_name, created_at"
    )
    return [dict(r) for r in rows]


async def list_hosted(
    db: Executor,
    *,
    peer_instance_id: str | None = None,
    state: str | None = None,
    agent_id: uuid.UUID | None = None,
    agent_type: str | None = None,
    task_id: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Runs peers started on this instance, newest first."""
    rows = await db.fetch(
        f"SELECT *, {PEER_KIND} FROM agents WHERE role = 'executor'"
        " AND peer_instance_id <> '_local'"  # local runs are the users' own: /agents shows them
        " AND ($1::text IS NULL OR peer_instance_id = $1) AND ($2::text IS NULL OR state = $2)"
        " AND ($3::uuid IS NULL OR agent_id = $3) AND ($6::text IS NULL OR agent_type = $6)"
        " AND ($7::text IS NULL OR task_id = $7)"
        " ORDER BY created_at DESC, agent_id LIMIT $4 OFFSET $5",
        peer_instance_id,
        state,
        agent_id,
        limit,
        offset,
        agent_type,
        task_id,
    )
    return [dict(r) for r in rows]
