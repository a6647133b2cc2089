"""Queries of one instance's store, grouped by table. Each takes a pool or a connection."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import datetime
from typing import Any

import asyncpg

from federation.store.db import row_dict

Executor = asyncpg.Pool | asyncpg.Connection

TERMINAL_STATES = frozenset({"completed", "failed", "killed", "timed_out"})

DEFAULT_GRANTS: dict[str, Any] = {
    "commandTypes": ["agent.spawn", "agent.status", "agent.kill"],
    "agentTypes": ["worker", "reviewer", "tester"],
}


# --- API tokens -------------------------------------------------------------------------


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def create_token(db: Executor, *, name: str, role: str, workspace: str = "default") -> str:
    token = "fa_" + secrets.token_urlsafe(32)
    await db.execute(
        "INSERT INTO api_tokens (token_hash, name, role, workspace) VALUES ($1, $2, $3, $4)",
        hash_token(token),
        name,
        role,
        workspace,
    )
    return token


async def find_token(db: Executor, token: str) -> dict[str, Any] | None:
    return row_dict(
        await db.fetchrow(
            "SELECT name, role, workspace FROM api_tokens WHERE token_hash = $1", hash_token(token)
        )
    )


# --- connections ------------------------------------------------------------------------


async def insert_connection(
    db: Executor,
    *,
    connection_id: uuid.UUID,
    remote_instance_id: str,
    remote_name: str,
    remote_url: str,
    remote_keys: list[dict[str, Any]],
    direction: str,
    status: str = "PENDING",
    grants: dict[str, Any] | None = None,
) -> dict[str, Any]:
    row = await db.fetchrow(
        "INSERT INTO connections (connection_id, remote_instance_id, remote_name, remote_url,"
        " remote_keys, direction, status, grants) VALUES ($1,$2,$3,$4,$5,$6,$7,$8) RETURNING *",
        connection_id,
        remote_instance_id,
        remote_name,
        remote_url,
        remote_keys,
        direction,
        status,
        grants if grants is not None else DEFAULT_GRANTS,
    )
    assert row is not None
    return dict(row)


async def get_connection(db: Executor, connection_id: uuid.UUID) -> dict[str, Any] | None:
    return row_dict(
        await db.fetchrow("SELECT * FROM connections WHERE connection_id = $1", connection_id)
    )


async def connection_for_peer(db: Executor, remote_instance_id: str) -> dict[str, Any] | None:
    """The live connection with a peer, or else its most recent ended one."""
    return row_dict(
        await db.fetchrow(
            "SELECT * FROM connections WHERE remote_instance_id = $1"
            " ORDER BY (status <> 'DISCONNECTED') DESC, updated_at DESC LIMIT 1",
            remote_instance_id,
        )
    )


async def list_connections(db: Executor) -> list[dict[str, Any]]:
    return [dict(r) for r in await db.fetch("SELECT * FROM connections ORDER BY created_at")]


async def set_connection_status(
    db: Executor, connection_id: uuid.UUID, status: str, *, expect: tuple[str, ...] | None = None
) -> dict[str, Any] | None:
    """Move a connection to `status` if it is in one of `expect`; None when it is not."""
    if expect is None:
        row = await db.fetchrow(
            "UPDATE connections SET status = $2, updated_at = now()"
            " WHERE connection_id = $1 RETURNING *",
            connection_id,
            status,
        )
    else:
        row = await db.fetchrow(
            "UPDATE connections SET status = $2, updated_at = now()"
            " WHERE connection_id = $1 AND status = ANY($3::text[]) RETURNING *",
            connection_id,
            status,
            list(expect),
        )
    return row_dict(row)


# --- replay cache and message log ---------------------------------------------------------


async def remember_message_id(
    db: Executor, sender_id: str, message_id: str, expires_at: datetime
) -> bool:
    """Record a messageId; False if it was seen before."""
    status = await db.execute(
        "INSERT INTO seen_messages (sender_id, message_id, expires_at) VALUES ($1, $2, $3)"
        " ON CONFLICT DO NOTHING",
        sender_id,
        message_id,
        expires_at,
    )
    return bool(status.endswith(" 1"))


async def expire_message_ids(db: Executor) -> int:
    status = await db.execute("DELETE FROM seen_messages WHERE expires_at < now()")
    return int(status.split()[-1])


async def record_message(
    db: Executor, envelope: dict[str, Any], *, direction: str, agent_id: uuid.UUID | None = None
) -> None:
    await db.execute(
        "INSERT INTO messages (message_id, direction, type, command_type, sender_id,"
        " recipient_id, correlation_id, agent_id, payload) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)"
        " ON CONFLICT DO NOTHING",
        envelope["messageId"],
        direction,
        envelope["type"],
        envelope.get("commandType"),
        envelope["senderId"],
        envelope["recipientId"],
        envelope.get("correlationId"),
        agent_id,
        envelope.get("payload", {}),
    )


# --- agents -------------------------------------------------------------------------------


async def insert_agent(db: Executor, **fields: Any) -> bool:
    """Insert an agent row; False when a row with the same identity already exists."""
    columns = list(fields)
    placeholders = ", ".join(f"${i + 1}" for i in range(len(columns)))
    status = await db.execute(
        f"INSERT INTO agents ({', '.join(columns)}) VALUES ({placeholders}) ON CONFLICT DO NOTHING",
        *fields.values(),
    )
    return bool(status.endswith(" 1"))


async def get_requested_agent(db: Executor, agent_id: uuid.UUID) -> dict[str, Any] | None:
    return row_dict(
        await db.fetchrow(
            "SELECT * FROM agents WHERE role = 'requester' AND agent_id = $1", agent_id
        )
    )


async def get_executed_agent(
    db: Executor, requester_id: str, agent_id: uuid.UUID
) -> dict[str, Any] | None:
    return row_dict(
        await db.fetchrow(
            "SELECT * FROM agents WHERE role = 'executor' AND peer_instance_id = $1"
            " AND agent_id = $2",
            requester_id,
            agent_id,
        )
    )


async def list_agents(
    db: Executor, *, role: str | None = None, limit: int = 100, offset: int = 0
) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT * FROM agents WHERE ($1::text IS NULL OR role = $1)"
        " ORDER BY created_at DESC LIMIT $2 OFFSET $3",
        role,
        limit,
        offset,
    )
    return [dict(r) for r in rows]


async def apply_requester_update(
    db: Executor,
    agent_id: uuid.UUID,
    *,
    seq: int,
    state: str,
    progress: dict[str, Any] | None,
    result: dict[str, Any] | None,
    error: str | None,
    attempt: int | None = None,
) -> bool:
    """Apply a state/progress report from the executor to the requester's projection.

    Reports carry the executor's per-agent sequence number: an older or repeated one changes
    nothing, and a terminal state is final whatever arrives after it.
    """
    status = await db.execute(
        "UPDATE agents SET seq = $2, state = $3, progress = COALESCE($4, progress),"
        " result = COALESCE($5, result), error = COALESCE($6, error),"
        " attempt = COALESCE($7, attempt), updated_at = now(),"
        " started_at = CASE WHEN $3 <> 'spawning' THEN COALESCE(started_at, now())"
        "              ELSE started_at END,"
        " finished_at = CASE WHEN $3 = ANY($8::text[]) THEN now() ELSE NULL END"
        " WHERE role = 'requester' AND agent_id = $1 AND seq < $2"
        " AND NOT (state = ANY($8::text[]))",
        agent_id,
        seq,
        state,
        progress,
        result,
        error,
        attempt,
        list(TERMINAL_STATES),
    )
    return bool(status.endswith(" 1"))


async def force_requester_final(
    db: Executor,
    agent_id: uuid.UUID,
    *,
    state: str,
    result: dict[str, Any] | None,
    error: str | None,
) -> None:
    """The requester's own final word (its workflow ended): terminal, whatever came before."""
    await db.execute(
        "UPDATE agents SET state = $2, result = COALESCE($3, result), error = COALESCE($4, error),"
        " updated_at = now(), finished_at = COALESCE(finished_at, now())"
        " WHERE role = 'requester' AND agent_id = $1 AND NOT (state = ANY($5::text[]))",
        agent_id,
        state,
        result,
        error,
        list(TERMINAL_STATES),
    )


async def update_executed_agent(
    db: Executor,
    requester_id: str,
    agent_id: uuid.UUID,
    *,
    state: str | None = None,
    progress: dict[str, Any] | None = None,
    result: dict[str, Any] | None = None,
    error: str | None = None,
    attempt: int | None = None,
) -> dict[str, Any] | None:
    """Change the executor's record and bump its sequence number; terminal states are final."""
    row = await db.fetchrow(
        "UPDATE agents SET seq = seq + 1, state = COALESCE($3, state),"
        " progress = COALESCE($4, progress), result = COALESCE($5, result),"
        " error = COALESCE($6, error), attempt = COALESCE($7, attempt), updated_at = now(),"
        " started_at = CASE WHEN $3 = 'running' THEN COALESCE(started_at, now())"
        "              ELSE started_at END,"
        " finished_at = CASE WHEN $3 = ANY($8::text[]) THEN now() ELSE finished_at END"
        " WHERE role = 'executor' AND peer_instance_id = $1 AND agent_id = $2"
        " AND NOT (state = ANY($8::text[]))"
        " RETURNING *",
        requester_id,
        agent_id,
        state,
        progress,
        result,
        error,
        attempt,
        list(TERMINAL_STATES),
    )
    return row_dict(row)


async def count_running_for_peer(db: Executor, requester_id: str) -> int:
    value = await db.fetchval(
        "SELECT count(*) FROM agents WHERE role = 'executor' AND peer_instance_id = $1"
        " AND NOT (state = ANY($2::text[]))",
        requester_id,
        list(TERMINAL_STATES),
    )
    return int(value or 0)


# --- audit --------------------------------------------------------------------------------


async def audit(
    db: Executor, *, actor: str, action: str, outcome: str = "ok", **details: Any
) -> None:
    await db.execute(
        "INSERT INTO audit_log (actor, action, outcome, details) VALUES ($1, $2, $3, $4)",
        actor,
        action,
        outcome,
        details,
    )
