"""Once-per-instance jobs on a real PostgreSQL: one holder at a time, freed on exit or death."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from cli.devstack import DevStack
from federation.store.db import create_pool, holds_session_state
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


async def test_a_pooled_connection_goes_back_without_a_session_lock_it_never_unlocked(
    stack: DevStack,
) -> None:
    """Pooled connections go back without asyncpg's reset query (one round trip fewer per
    query), except one that took session-level state: a job's lock whose unlock never ran
    (its block cancelled mid-unlock) is released with the connection."""
    assert stack._pg is not None
    uri = stack._pg.get_uri()
    small = await create_pool(uri, min_size=1, max_size=1)
    other = await asyncpg.connect(uri)
    key = JOB_LOCK_PREFIX + f"probe-{uuid.uuid4().hex[:8]}"
    try:
        async with small.acquire() as conn:
            holds_session_state(conn)
            assert await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key)
        assert await other.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key)
        # Any other connection goes back as it is: what the round trip saved means.
        async with small.acquire() as conn:
            await conn.execute("SET application_name = 'kept'")
        async with small.acquire() as conn:
            assert await conn.fetchval("SHOW application_name") == "kept"
    finally:
        await other.close()
        await small.close()


async def test_message_expiry_and_audit_partitions_run_in_one_replica_at_a_time(
    stack: DevStack,
) -> None:
    from types import SimpleNamespace

    from api.main import audit_round, expire_round
    from federation.settings import Settings

    database_url = stack.instances["spoke"].info["databaseUrl"]
    spoke = await create_pool(database_url, max_size=3)
    settings = Settings(database_url=database_url, instance_name="spoke")
    app = SimpleNamespace(state=SimpleNamespace(pool=spoke, settings=settings))
    sender = f"probe-{uuid.uuid4().hex[:8]}"
    try:
        await spoke.execute(
            "INSERT INTO seen_messages (sender_id, message_id, expires_at)"
            " VALUES ($1, 'm-1', now() - interval '1 hour')",
            sender,
        )
        # Another replica holds the job: this one's round does nothing.
        async with instance_job(spoke, "expire-messages") as other:
            assert other
            assert await expire_round(app) is False  # type: ignore[arg-type]
            left = await spoke.fetchval(
                "SELECT count(*) FROM seen_messages WHERE sender_id = $1", sender
            )
            assert left == 1
        async with instance_job(spoke, "audit-partitions") as other:
            assert await audit_round(app, 30) is False  # type: ignore[arg-type]
        assert await expire_round(app) is True  # type: ignore[arg-type]
        assert not await spoke.fetchval(
            "SELECT count(*) FROM seen_messages WHERE sender_id = $1", sender
        )
        assert await audit_round(app, 30) is True  # type: ignore[arg-type]
    finally:
        await spoke.close()
