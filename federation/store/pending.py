"""Connection requests from strangers waiting for this instance's admin: how many, from where,
and when they expire."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

INBOUND_PENDING = "direction = 'inbound' AND status = 'PENDING'"


@dataclass(frozen=True)
class Waiting:
    """PENDING inbound requests: in all, from one source, naming one host."""

    total: int
    from_source: int
    for_host: int


async def count_pending_inbound(db: Any) -> int:
    """PENDING connections other instances asked for (each a stranger until accepted)."""
    count = await db.fetchval(f"SELECT count(*) FROM connections WHERE {INBOUND_PENDING}")
    return int(count or 0)


async def waiting(db: Any, *, source: str, host: str) -> Waiting:
    row = await db.fetchrow(
        "SELECT count(*) AS total,"
        " count(*) FILTER (WHERE request_source = $1) AS from_source,"
        " count(*) FILTER (WHERE request_host = $2) AS for_host"
        f" FROM connections WHERE {INBOUND_PENDING}",
        source,
        host,
    )
    return Waiting(int(row["total"]), int(row["from_source"]), int(row["for_host"]))


async def remember_origin(db: Any, connection_id: uuid.UUID, *, source: str, host: str) -> None:
    await db.execute(
        "UPDATE connections SET request_source = $2, request_host = $3 WHERE connection_id = $1",
        connection_id,
        source,
        host,
    )


async def expire(db: Any, ttl_seconds: int) -> list[dict[str, Any]]:
    """End the requests older than `ttl_seconds` nobody answered; returns them."""
    rows = await db.fetch(
        "UPDATE connections SET status = 'DISCONNECTED', updated_at = now()"
        f" WHERE {INBOUND_PENDING} AND created_at < now() - make_interval(secs => $1)"
        " RETURNING connection_id, remote_instance_id, request_source, request_host",
        float(ttl_seconds),
    )
    return [dict(r) for r in rows]
