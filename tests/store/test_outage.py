"""Store writes wait out a database outage (a real PostgreSQL stopped and started again) and
fail at once on a statement the database refuses; a running agent's activity heartbeats while
it waits and, once the database stayed away too long, asks for its next attempt later."""

from __future__ import annotations

import asyncio
import time
import uuid
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

import workflows.models as m
from activities.agents import STORE_RETRY_DELAY, AgentActivities
from federation.settings import Settings
from federation.store import conversations
from federation.store.db import create_pool, migrate
from federation.store.outage import StoreUnavailable, is_outage, wait_for_store


def _start_server(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        return pgserver.get_server(path, cleanup_mode="stop")  # type: ignore[attr-defined]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[Path, list[Any]]]:
    """A PostgreSQL of this test's own, which the test stops and starts."""
    path = tmp_path / "pg"
    running = [await asyncio.to_thread(_start_server, path)]
    try:
        yield path, running
    finally:
        for each in running:
            await asyncio.to_thread(each.cleanup)


async def test_a_checkpoint_saved_while_postgres_is_away_is_saved_once_it_is_back(
    server: tuple[Path, list[Any]],
) -> None:
    path, running = server
    pool = await create_pool(running[0].get_uri())
    try:
        await migrate(pool)
        agent_id = uuid.uuid4()
        await asyncio.to_thread(running.pop().cleanup)  # the database goes away

        async def save() -> dict[str, Any] | None:
            return await conversations.save_checkpoint(
                pool,
                requester_id="hub",
                agent_id=agent_id,
                attempt=1,
                state={"writer": 1},
                turn_count=1,
                usage={},
                tokens=0,
                entries=[{"kind": "text", "text": "step"}],
                transcript_limit=1 << 20,
                entries_before=0,
            )

        with pytest.raises(Exception) as refused:
            await save()
        assert is_outage(refused.value)
        waiting = asyncio.create_task(wait_for_store(save, what="checkpoint", patience=60))
        await asyncio.sleep(3)
        assert not waiting.done()  # still waiting, not failed
        running.append(await asyncio.to_thread(_start_server, path))
        summary = await asyncio.wait_for(waiting, 60)
        assert summary is not None and summary["entries"] == 1
        # Made again (its answer lost after the commit), the save appends its entries once.
        assert (await save() or {}).get("entries") == 1
        count = await pool.fetchval(
            "SELECT count(*) FROM agent_transcript WHERE agent_id = $1", agent_id
        )
        assert count == 1
    finally:
        await pool.close()


async def test_a_refused_statement_or_an_outage_longer_than_the_patience_fails(
    server: tuple[Path, list[Any]],
) -> None:
    path, running = server
    pool = await create_pool(running[0].get_uri())
    try:
        started = time.monotonic()
        with pytest.raises(asyncpg.UndefinedTableError):
            await wait_for_store(
                lambda: pool.fetchval("SELECT 1 FROM no_such_table"), what="read", patience=60
            )
        assert time.monotonic() - started < 5  # refused: not asked again
        await asyncio.to_thread(running.pop().cleanup)
        with pytest.raises(StoreUnavailable) as away:
            await wait_for_store(lambda: pool.fetchval("SELECT 1"), what="read", patience=2)
        assert away.value.__cause__ is not None and is_outage(away.value.__cause__)
    finally:
        await pool.close()


async def test_an_agent_run_heartbeats_while_it_waits_and_then_asks_to_be_retried_later(
    server: tuple[Path, list[Any]], tmp_path: Path
) -> None:
    path, running = server
    pool = await create_pool(running[0].get_uri())
    try:
        await asyncio.to_thread(running.pop().cleanup)  # away when the attempt starts
        settings = Settings(  # type: ignore[call-arg]
            instance_name="unit", data_dir=tmp_path, store_outage_wait=2.0
        )
        env = ActivityEnvironment()
        beats: list[Any] = []
        env.on_heartbeat = lambda *details: beats.append(details)
        agent_id = str(uuid.uuid4())
        task = m.RunTask(
            agent_id=agent_id,
            requester_id="hub",
            connection_id=str(uuid.uuid4()),
            task_id="t",
            agent_type="worker",
            context={"instructions": "$ true"},
            timeout_seconds=60,
            max_retries=0,
            workflow_id=m.agent_run_workflow_id("hub", agent_id),
            heartbeat_interval=0.2,
        )
        async with httpx.AsyncClient() as http:
            with pytest.raises(ApplicationError) as away:
                await env.run(AgentActivities(pool, http, settings).run_agent, task)
        assert away.value.type == m.STORE_UNAVAILABLE and not away.value.non_retryable
        assert away.value.next_retry_delay == STORE_RETRY_DELAY  # not the 1/2/4/8 s backoff
        assert len(beats) >= 5  # it kept heartbeating the ~2 s it waited
    finally:
        await pool.close()


async def test_a_transaction_cut_off_by_the_database_going_away_is_an_outage(
    server: tuple[Path, list[Any]],
) -> None:
    """PostgreSQL shuts down under a checkpoint's open transaction: asyncpg then reports that
    it cannot end the transaction on a closed connection (the outage is that error's context,
    not its cause). Waited out like any outage, not failed at once."""
    path, running = server
    pool = await create_pool(running[0].get_uri())
    try:
        with pytest.raises(Exception) as cut:
            async with pool.acquire() as conn, conn.transaction():
                statement = asyncio.create_task(conn.execute("SELECT pg_sleep(30)"))
                await asyncio.sleep(0.5)
                await asyncio.to_thread(running.pop().cleanup)  # the database goes away
                await statement
        assert isinstance(cut.value, asyncpg.InterfaceError), repr(cut.value)
        assert is_outage(cut.value), repr(cut.value)
    finally:
        await pool.close()
