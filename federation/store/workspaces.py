"""Workspace snapshots of runs (`agents.snapshot`): their files and manifests by sha256 in
`workspace_blobs`, and which snapshot a run's latest checkpoint holds."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import asyncpg

from federation.store.repos import Executor

# Storing snapshots takes this lock shared, forgetting the blobs of ended runs exclusive: a
# blob a run links while another forgets it is never deleted under it.
BLOBS_LOCK = "fedagent:workspace-blobs"


async def put_blobs(
    pool: asyncpg.Pool,
    blobs: Mapping[str, bytes],
    *,
    requester_id: str,
    agent_id: uuid.UUID,
    link: Iterable[str] = (),
) -> int:
    """Link the run to the blobs `link` names, and store the blobs not stored yet (named by
    their sha256); returns how many were new."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock_shared(hashtext($1))", BLOBS_LOCK)
        links = sorted(set(link) | set(blobs))
        if links:
            await conn.executemany(
                "INSERT INTO workspace_run_blobs (requester_id, agent_id, sha256)"
                " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                [(requester_id, agent_id, sha) for sha in links],
            )
        if not blobs:
            return 0
        known = {
            r["sha256"]
            for r in await conn.fetch(
                "SELECT sha256 FROM workspace_blobs WHERE sha256 = ANY($1::text[])", list(blobs)
            )
        }
        missing = [(sha, len(data), data) for sha, data in blobs.items() if sha not in known]
        if missing:
            await conn.executemany(
                "INSERT INTO workspace_blobs (sha256, bytes, data) VALUES ($1, $2, $3)"
                " ON CONFLICT DO NOTHING",
                missing,
            )
    return len(missing)


async def forget_ended(pool: asyncpg.Pool, ended_states: Iterable[str]) -> int:
    """Drop the snapshot links of runs that have ended here, then the blobs no run holds any
    more; returns how many blobs went."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", BLOBS_LOCK)
        released = await conn.fetch(
            "DELETE FROM workspace_run_blobs l USING agents a"
            " WHERE a.role = 'executor' AND a.peer_instance_id = l.requester_id"
            " AND a.agent_id = l.agent_id AND a.state = ANY($1::text[])"
            " RETURNING l.sha256",
            list(ended_states),
        )
        shas = sorted({r["sha256"] for r in released})
        if not shas:
            return 0
        status = await conn.execute(
            "DELETE FROM workspace_blobs b WHERE b.sha256 = ANY($1::text[])"
            " AND NOT EXISTS (SELECT 1 FROM workspace_run_blobs l WHERE l.sha256 = b.sha256)",
            shas,
        )
    return int(status.split()[-1])


async def get_blobs(db: Executor, shas: Iterable[str]) -> dict[str, bytes]:
    rows = await db.fetch(
        "SELECT sha256, data FROM workspace_blobs WHERE sha256 = ANY($1::text[])", list(shas)
    )
    return {r["sha256"]: bytes(r["data"]) for r in rows}


async def blob_sizes(db: Executor, shas: Iterable[str]) -> dict[str, int]:
    """The stored length of each blob (its bytes as held, not the `bytes` column)."""
    rows = await db.fetch(
        "SELECT sha256, octet_length(data) AS size FROM workspace_blobs"
        " WHERE sha256 = ANY($1::text[])",
        list(shas),
    )
    return {r["sha256"]: int(r["size"]) for r in rows}


async def latest(db: Executor, requester_id: str, agent_id: uuid.UUID) -> dict[str, Any] | None:
    """The workspace the run's latest checkpoint holds (of its latest try that has one)."""
    value = await db.fetchval(
        "SELECT workspace FROM agent_conversations"
        " WHERE requester_id = $1 AND agent_id = $2 AND workspace IS NOT NULL"
        " ORDER BY attempt DESC LIMIT 1",
        requester_id,
        agent_id,
    )
    return dict(value) if value is not None else None
