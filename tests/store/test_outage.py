"""Store writes wait out a database outage (a real PostgreSQL stopped and started again) and
fail at once on a statement the database refuses."""

from __future__ import annotations

import asyncio
import time
import uuid
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

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
