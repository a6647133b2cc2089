"""Workspace snapshots of runs (`agents.snapshot`): their files and manifests by sha256 in
`workspace_blobs`, and which snapshot a run's latest checkpoint holds."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import asyncpg

from federation.store.repos import Executor


async def put_blobs(pool: asyncpg.Pool, blobs: Mapping[str, bytes]) -> int:
    """Store the blobs not stored yet (named by their sha256); returns how many were new."""
    if not blobs:
        return 0
    async with pool.acquire() as conn:
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


async def get_blobs(db: Executor, shas: Iterable[str]) -> dict[str, bytes]:
    rows = await db.fetch(
        "SELECT sha256, data FROM workspace_blobs WHERE sha256 = ANY($1::text[])", list(shas)
    )
    return {r["sha256"]: bytes(r["data"]) for r in rows}


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
