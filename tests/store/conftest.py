"""Fixtures of the store tests: a database of a test's (or a module's) own on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from federation.store.db import create_pool, migrate

NewDatabase = Callable[..., AbstractAsyncContextManager[asyncpg.Pool]]


@contextlib.asynccontextmanager
async def _new_database(
    server: Any, prefix: str, *, migrated: bool = True
) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a new database `<prefix>_<random>` of `server` (a pgserver), migrated unless
    told not to; the pool is closed and the database dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server.get_uri())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    pool = await create_pool(server.get_uri(name))
    try:
        if migrated:
            await migrate(pool)
        yield pool
    finally:
        await pool.close()
        admin = await asyncpg.connect(server.get_uri())
        try:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(scope="session")
def new_database() -> NewDatabase:
    """`async with new_database(server, "prefix") as pool:` a database of its own."""
    return _new_database


@pytest.fixture(scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    """A real PostgreSQL of the module's own (no whole stack needed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        made: Any = await asyncio.to_thread(
            pgserver.get_server,  # type: ignore[attr-defined]
            Path(tmp_path_factory.mktemp("pg")),
            cleanup_mode="stop",
        )
    try:
        yield made
    finally:
        await asyncio.to_thread(made.cleanup)
