"""Jobs that run once per instance, whichever of its processes gets there first.

Every API replica and worker of an instance shares one PostgreSQL database, so a session-level
advisory lock named after the job says who runs it now. The lock lives as long as the
connection that took it: a process that dies frees it, and the next one to try takes over.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

JOB_LOCK_PREFIX = "fedagent:job:"


@asynccontextmanager
async def instance_job(pool: asyncpg.Pool, name: str) -> AsyncIterator[bool]:
    """Yield True when this process holds the instance-wide lock of job `name` (run it), False
    when another process holds it (skip this round). The lock is held until the block ends."""
    key = JOB_LOCK_PREFIX + name
    async with pool.acquire() as conn:
        held = bool(await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key))
        try:
            yield held
        finally:
            if held:
                await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", key)
