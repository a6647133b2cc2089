"""The schema: one initial migration for 0.1.0, later ones numbered uniquely after it, each
applied once on a real PostgreSQL."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from cli.devstack import DevStack
from federation.store.db import _migrations, migrate

if TYPE_CHECKING:
    from tests.store.conftest import NewDatabase

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


async def test_a_new_database_gets_every_migration_once(
    stack: DevStack, new_database: NewDatabase
) -> None:
    async with new_database(stack._pg, "migrations", migrated=False) as pool:
        assert await migrate(pool) == [name for name, _ in _migrations()]
        assert await migrate(pool) == []
        tables = {r["tablename"] for r in await pool.fetch("SELECT tablename FROM pg_tables")}
        assert {"instance", "connections", "agents", "audit_log", "event_streams"} <= tables
