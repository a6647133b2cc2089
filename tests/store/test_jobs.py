"""Once-per-instance jobs on a real PostgreSQL: one holder at a time, freed on exit or death."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from cli.devstack import DevStack
from federation.store.db import create_pool
from federation.store.jobs import JOB_LOCK_PREFIX, instance_job


@pytest.fixture(scope="module")
async def pool(stack: DevStack) -> AsyncIterator[asyncpg.Pool]:
    server = stack._pg
    assert server is not None
    pool = await create_pool(server.get_uri())
    yield pool
    await pool.close()


async def test_one_process_at_a_time_holds_a_job(pool: asyncpg.Pool) -> None:
    name = f"probe-{uuid.uuid4().hex[:8]}"
    async with instance_job(pool, name) as first:
        assert first
        async with instance_job(pool, name) as second:
            assert not second  # another session holds it
        async with instance_job(pool, name + "-other") as other:
            assert other  # jobs of other names are independent
    async with instance_job(pool, name) as again:
        assert again  # released when the holder's block ended


async def test_a_dead_holder_frees_the_job(pool: asyncpg.Pool, stack: DevStack) -> None:
    name = f"probe-{uuid.uuid4().hex[:8]}"
    assert stack._pg is not None
    holder = await asyncpg.connect(stack._pg.get_uri())
    assert await holder.fetchval(
        "SELECT pg_try_advisory_lock(hashtext($1))", JOB_LOCK_PREFIX + name
    )
    async with instance_job(pool, name) as held:
        assert not held
    holder.terminate()  # the process holding it dies; its backend ends a moment later
    for _ in range(50):
        async with instance_job(pool, name) as held:
            if held:
                return
        await asyncio.sleep(0.1)
    raise AssertionError("the job stayed held after its holder died")
