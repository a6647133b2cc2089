"""The open event streams (SSE) of each API token, shared by every API process of an instance.

A stream holds a lease row while it is open and renews it on a bound while its token is still
valid; it deletes the row when it ends. A lease whose process died is not renewed and stops
counting once it expires.
"""

from __future__ import annotations

import uuid

import asyncpg

from federation.store.repos import Executor


async def open_stream(
    pool: asyncpg.Pool,
    *,
    token_id: uuid.UUID,
    agent_id: uuid.UUID,
    limit: int,
    lease_seconds: float,
) -> uuid.UUID | None:
    """A lease for one more stream of `token_id`, or None when it holds `limit` already."""
    async with pool.acquire() as conn, conn.transaction():
        # Concurrent opens of one token are counted one after the other.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('fedagent:streams:' || $1))", str(token_id)
        )
        await conn.execute(
            "DELETE FROM event_streams WHERE token_id = $1 AND expires_at <= now()", token_id
        )
        open_now = await conn.fetchval(
            "SELECT count(*) FROM event_streams WHERE token_id = $1", token_id
        )
        if open_now >= limit:
            return None
        stream_id = uuid.uuid4()
        await conn.execute(
            "INSERT INTO event_streams (stream_id, token_id, agent_id, expires_at)"
            " VALUES ($1, $2, $3, now() + make_interval(secs => $4::double precision))",
            stream_id,
            token_id,
            agent_id,
            lease_seconds,
        )
        return stream_id


async def renew_stream(
    db: Executor, stream_id: uuid.UUID, token_id: uuid.UUID, lease_seconds: float
) -> bool:
    """Extend the lease if the token is still valid (not revoked, not expired); False: the
    stream must end now."""
    renewed = await db.fetchval(
        "UPDATE event_streams SET expires_at = now() + make_interval(secs => $3::double precision)"
        " WHERE stream_id = $1 AND EXISTS (SELECT 1 FROM api_tokens WHERE id = $2"
        "  AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now()))"
        " RETURNING 1",
        stream_id,
        token_id,
        lease_seconds,
    )
    return renewed is not None


async def close_stream(db: Executor, stream_id: uuid.UUID) -> None:
    await db.execute("DELETE FROM event_streams WHERE stream_id = $1", stream_id)
