"""PostgreSQL access: the asyncpg pool and the SQL migrations."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import asyncpg

from agents.text import clean_json, json_needs_cleaning

MIGRATION_LOCK = 0x6665_6461  # pg_advisory_lock key shared by every process of an instance


def encode_json(value: Any) -> str:
    """JSON for json/jsonb columns, every string made safe by `agents.text`'s rule.

    PostgreSQL refuses NUL (`\\u0000`) and lone surrogates in jsonb, and a write it refuses
    fails on every try: what an agent produced (a checkpoint, a transcript entry, a result)
    must never be such a value, nor a number JSON has no text for (NaN, infinities), which
    jsonb refuses as well. The rare value holding one is cleaned; others pass as dumped."""
    try:
        text = json.dumps(value, allow_nan=False)
    except ValueError:
        return json.dumps(clean_json(value), allow_nan=False)
    if json_needs_cleaning(text):
        text = json.dumps(clean_json(value))
    return text


async def _init_connection(conn: asyncpg.Connection) -> None:
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name, encoder=encode_json, decoder=json.loads, schema="pg_catalog"
        )


# Server pids of pooled connections that took session-level state (a session advisory lock):
# the pool resets only those when they go back. asyncpg's default reset query (release every
# advisory lock, close cursors, UNLISTEN, RESET ALL) is one more round trip per release, which
# nothing else here needs: no pooled connection LISTENs or SETs, transactions and their locks
# end with them, and asyncpg rolls back a transaction left open before this runs.
_SESSION_STATE: set[int] = set()


def holds_session_state(conn: asyncpg.Connection) -> None:
    """Say so before taking a session-level advisory lock on a pooled connection: whatever
    becomes of the unlock, the pool then releases every such lock when it takes it back."""
    _SESSION_STATE.add(conn.get_server_pid())


async def _reset_session(conn: asyncpg.Connection) -> None:
    if conn.get_server_pid() in _SESSION_STATE:
        _SESSION_STATE.discard(conn.get_server_pid())
        reset = conn.get_reset_query()
        if reset:
            await conn.execute(reset)


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=_init_connection, reset=_reset_session
    )
    assert pool is not None
    return pool


def _migrations() -> list[tuple[str, str]]:
    folder = resources.files("federation.store") / "migrations"
    files = sorted((p.name, p.read_text()) for p in folder.iterdir() if p.name.endswith(".sql"))
    return files


async def migrate(pool: asyncpg.Pool) -> list[str]:
    """Apply the migrations that are missing; safe to call from many processes at once."""
    applied: list[str] = []
    async with pool.acquire() as conn:
        holds_session_state(conn)
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
            for name, sql in _migrations():
                if name in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
                applied.append(name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied


def row_dict(record: asyncpg.Record | None) -> dict[str, Any] | None:
    return dict(record) if record is not None else None
