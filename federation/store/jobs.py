"""Jobs that run once per instance, whichever of its processes gets there first.

Every API replica and worker of an instance shares one PostgreSQL database, so a session-level
advisory lock named after the job says who runs it now. The lock lives as long as the
connection that took it: a process that dies frees it, and the next one to try takes over.

A job worked in rounds keeps where it stands in `instance_jobs` (when its last round ran, and
the cursor it stopped at), so the next round goes on from there in whichever process takes it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from federation.store.db import holds_session_state
from federation.store.repos import Executor

JOB_LOCK_PREFIX = "fedagent:job:"


@asynccontextmanager
async def instance_job(pool: asyncpg.Pool, name: str) -> AsyncIterator[bool]:
    """Yield True when this process holds the instance-wide lock of job `name` (run it), False
    when another process holds it (skip this round). The lock is held until the block ends."""
    key = JOB_LOCK_PREFIX + name
    async with pool.acquire() as conn:
        holds_session_state(conn)
        held = bool(await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key))
        try:
            yield held
        finally:
            if held:
                await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", key)


async def claim_round(db: Executor, name: str, *, every: float) -> tuple[bool, Any]:
    """Under the job's lock: start a round of `name` unless one started less than `every`
    seconds ago. Returns (due, cursor the last round stopped at)."""
    row = await db.fetchrow(
        "INSERT INTO instance_jobs (name, last_run_at) VALUES ($1, now())"
        " ON CONFLICT (name) DO UPDATE SET last_run_at = now()"
        "  WHERE instance_jobs.last_run_at IS NULL"
        "   OR instance_jobs.last_run_at <= now() - make_interval(secs => $2)"
        " RETURNING cursor",
        name,
        every,
    )
    return (False, None) if row is None else (True, row["cursor"])


async def save_cursor(db: Executor, name: str, cursor: Any) -> None:
    """Where the next round of `name` starts (None: from the beginning)."""
    await db.execute("UPDATE instance_jobs SET cursor = $2 WHERE name = $1", name, cursor)
