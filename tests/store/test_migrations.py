"""The schema: one initial migration for 0.1.0, later ones numbered uniquely after it, each
applied once on a real PostgreSQL."""

from __future__ import annotations

import re
import uuid

import asyncpg

from cli.devstack import DevStack
from federation.store.db import _migrations, create_pool, migrate

NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def test_migrations_start_with_the_initial_schema_and_are_numbered_uniquely() -> None:
    names = [name for name, _ in _migrations()]
    assert names[0] == "0001_initial.sql"
    numbers = []
    for name in names:
        match = NAME.match(name)
        assert match, f"{name}: migrations are named NNNN_words.sql"
        numbers.append(match.group(1))
    assert len(numbers) == len(set(numbers)), f"two migrations share a number: {names}"


async def test_a_new_database_gets_every_migration_once(stack: DevStack) -> None:
    server = stack._pg
    assert server is not None
    name = f"migrations_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server.get_uri())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    pool = await create_pool(server.get_uri(name))
    try:
        assert await migrate(pool) == [name for name, _ in _migrations()]
        assert await migrate(pool) == []
        tables = {r["tablename"] for r in await pool.fetch("SELECT tablename FROM pg_tables")}
        assert {"instance", "connections", "agents", "audit_log", "event_streams"} <= tables
    finally:
        await pool.close()
        admin = await asyncpg.connect(server.get_uri())
        try:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        finally:
            await admin.close()
