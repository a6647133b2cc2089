"""Queries of one instance's store, grouped by table. Each takes a pool or a connection."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime
from typing import Any, TypeAlias

from agents.text import clean
from federation.states import LOCAL_REQUESTER, TERMINAL_STATES, ConnectionStatus
from federation.store.db import row_dict

# A pool or a connection (inside a transaction): both have execute/fetch/fetchrow/fetchval.
Executor: TypeAlias = Any

DEFAULT_GRANTS: dict[str, Any] = {
    "commandTypes": ["agent.spawn", "agent.status", "agent.kill", "agent.artifact"],
    "agentTypes": ["worker", "reviewer", "tester"],
}


# --- API tokens -------------------------------------------------------------------------


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def find_token(db: Executor, token: str) -> dict[str, Any] | None:
    return row_dict(
        await db.fetchrow(
            "SELECT id, name, role, workspace FROM api_tokens WHERE token_hash = $1"
            " AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())",
            hash_token(token),
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
    status: ConnectionStatus = ConnectionStatus.PENDING,
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


async def insert_a2a_connection(
    db: Executor,
    *,
    connection_id: uuid.UUID,
    remote_instance_id: str,
    remote_name: str,
    remote_url: str,
    a2a_endpoint: str,
    credentials_sealed: str | None,
) -> dict[str, Any]:
    """An A2A agent as a peer: ACTIVE at once (no handshake), outbound, it may ask nothing."""
    row = await db.fetchrow(
        "INSERT INTO connections (connection_id, remote_instance_id, remote_name, remote_url,"
        " remote_keys, direction, status, grants, kind, a2a_endpoint, credentials_sealed)"
        " VALUES ($1,$2,$3,$4,'[]'::jsonb,'outbound','ACTIVE',$5,'a2a',$6,$7) RETURNING *",
        connection_id,
        remote_instance_id,
        remote_name,
        remote_url,
        {"commandTypes": [], "agentTypes": [], "repositories": []},
        a2a_endpoint,
        credentials_sealed,
    )
    assert row is not None
    return dict(row)


async def keep_remote_task_id(db: Executor, agent_id: uuid.UUID, task_id: str) -> str:
    """Keep the A2A task id of a requester's run; the first one kept stays (answered)."""
    kept = await db.fetchval(
        "UPDATE agents SET remote_task_id = COALESCE(remote_task_id, $2)"
        " WHERE role = 'requester' AND agent_id = $1 RETURNING remote_task_id",
        agent_id,
        task_id,
    )
    return str(kept) if kept is not None else task_id


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


def agent_report(row: dict[str, Any]) -> dict[str, Any]:
    """What the executor tells the requester about a run (events, status and kill answers)."""
    return {
        "agentId": str(row["agent_id"]),
        "seq": row["seq"],
        "state": row["state"],
        "progress": row["progress"],
        "result": row["result"],
        "error": row["error"],
        "attempt": row["attempt"],
    }


async def get_requested_agent(db: Executor, agent_id: uuid.UUID) -> dict[str, Any] | None:
    return row_dict(
        await db.fetchrow(
            "SELECT * FROM agents WHERE role = 'requester' AND agent_id = $1", agent_id
        )
    )


async def unfinished_runs_of_connection(
    db: Executor, connection_id: uuid.UUID, role: str
) -> list[dict[str, Any]]:
    """Runs of a connection (this side's `role` in them) not in a final state yet."""
    rows = await db.fetch(
        "SELECT * FROM agents WHERE role = $1 AND connection_id = $2"
        " AND NOT (state = ANY($3::text[]))",
        role,
        connection_id,
        list(TERMINAL_STATES),
    )
    return [dict(r) for r in rows]


async def ended_connections_with_open_runs(
    db: Executor, within_days: int = 7
) -> list[dict[str, Any]]:
    """Connections suspended or disconnected (in the last `within_days`) that still have runs
    not in a final state."""
    rows = await db.fetch(
        "SELECT c.* FROM connections c WHERE c.status IN ('SUSPENDED', 'DISCONNECTED')"
        " AND c.updated_at > now() - make_interval(days => $1)"
        " AND EXISTS (SELECT 1 FROM agents a WHERE a.connection_id = c.connection_id"
        " AND NOT (a.state = ANY($2::text[])))",
        within_days,
        list(TERMINAL_STATES),
    )
    return [dict(r) for r in rows]


async def note_kill_confirmed(db: Executor, agent_id: uuid.UUID) -> None:
    """The executor confirmed a kill this requester asked for."""
    await db.execute(
        "UPDATE agents SET kill_confirmed = true WHERE role = 'requester' AND agent_id = $1",
        agent_id,
    )


# The kind of peer an agent row runs on, as a column `peer_kind` of the users' and hosted views:
# the connection's kind (`fedagent`, `a2a`), or `local` for a local run (no peer).
PEER_KIND = (
    f"CASE WHEN agents.role = 'executor' AND agents.peer_instance_id = '{LOCAL_REQUESTER}'"
    " THEN 'local' ELSE (SELECT c.kind FROM connections c"
    " WHERE c.connection_id = agents.connection_id) END AS peer_kind"
)


async def settle_kill_delivery(
    db: Executor,
    agent_id: uuid.UUID,
    *,
    outcome: str,
    note: str,
    answer: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """What became of a pending kill (see migration 0024). With `answer` (the executor's final
    report, `too_late`: the run had ended there on its own before the kill reached it), the
    requester's record becomes that end, since that is what happened: both sides then agree.
    Only a pending kill is settled (a retried delivery changes nothing); answers the row as it
    is then, or None when there is no such row."""
    confirmed = outcome in ("confirmed", "too_late", "not_found")
    adopt = answer is not None and outcome == "too_late"
    report = answer or {}
    # The event log gains the adopted end only when it changes the state (`before` holds the
    # row locked, so it is the state this update replaces).
    row = await db.fetchrow(
        "WITH before AS (SELECT agent_id, state FROM agents"
        " WHERE role = 'requester' AND agent_id = $1 AND kill_delivery = 'pending' FOR UPDATE),"
        " updated AS ("
        " UPDATE agents SET kill_delivery = $2, kill_delivery_note = $3,"
        " kill_confirmed = $4 OR coalesce(kill_confirmed, false),"
        " state = CASE WHEN $5 THEN $6 ELSE agents.state END,"
        " result = CASE WHEN $5 THEN $7 ELSE result END,"
        " error = CASE WHEN $5 THEN $8 ELSE error END,"
        " seq = CASE WHEN $5 THEN greatest(seq, $9) ELSE seq END,"
        " updated_at = now()"
        " FROM before WHERE agents.role = 'requester' AND agents.agent_id = before.agent_id"
        " RETURNING agents.*, before.state AS state_before),"
        " event AS (INSERT INTO agent_events (agent_id, seq, state, progress, error, attempt)"
        " SELECT agent_id, seq, state, progress, error, attempt FROM updated"
        " WHERE $5 AND state <> state_before)"
        " SELECT * FROM updated",
        agent_id,
        outcome,
        _text(note[:2000]),  # a peer's refusal detail is the peer's: kept bounded
        confirmed,
        adopt,
        str(report.get("state") or ""),
        report.get("result"),
        _text(report.get("error")),
        int(report.get("seq") or 0),
    )
    if row is None:
        row = await db.fetchrow(
            "SELECT * FROM agents WHERE role = 'requester' AND agent_id = $1", agent_id
        )
    settled = row_dict(row)
    if settled is not None:
        settled.pop("state_before", None)
    return settled


async def get_user_agent(db: Executor, agent_id: uuid.UUID) -> dict[str, Any] | None:
    """An agent of this instance's users: spawned on a peer (requester row) or a local run."""
    return row_dict(
        await db.fetchrow(
            f"SELECT *, {PEER_KIND} FROM agents WHERE agent_id = $1"
            " AND (role = 'requester' OR peer_instance_id = $2)",
            agent_id,
            LOCAL_REQUESTER,
        )
    )


async def count_local_running(db: Executor, workspace: str) -> int:
    """Unfinished local runs of one workspace."""
    value = await db.fetchval(
        "SELECT count(*) FROM agents WHERE role = 'executor' AND peer_instance_id = $1"
        " AND workspace = $2 AND NOT (state = ANY($3::text[]))",
        LOCAL_REQUESTER,
        workspace,
        list(TERMINAL_STATES),
    )
    return int(value or 0)


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
    db: Executor,
    *,
    role: str | None = None,
    with_local: bool = False,
    workspace: str | None = None,
    state: str | list[str] | None = None,
    connection_id: uuid.UUID | None = None,
    agent_type: str | None = None,
    task_id: str | None = None,
    updated_after: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
    count: bool = False,
) -> list[dict[str, Any]]:
    """`count`: each row also has `total_count`, the number of rows matching in all;
    `updated_after`: rows updated after it only."""
    rows = await db.fetch(
        f"SELECT *, {PEER_KIND}{', count(*) OVER () AS total_count' if count else ''}"
        " FROM agents"
        " WHERE ($1::text IS NULL OR role = $1"
        " OR ($9 AND role = 'executor' AND peer_instance_id = $10))"
        " AND ($2::text IS NULL OR workspace = $2) AND ($3::text[] IS NULL OR state = ANY($3))"
        " AND ($4::uuid IS NULL OR connection_id = $4) AND ($5::text IS NULL OR agent_type = $5)"
        " AND ($6::text IS NULL OR task_id = $6)"
        " AND ($11::timestamptz IS NULL OR updated_at > $11)"
        " ORDER BY created_at DESC, agent_id LIMIT $7 OFFSET $8",
        role,
        workspace,
        [state] if isinstance(state, str) else state,
        connection_id,
        agent_type,
        task_id,
        limit,
        offset,
        with_local,
        LOCAL_REQUESTER,
        updated_after,
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
        "WITH updated AS ("
        " UPDATE agents SET seq = $2, state = $3, progress = COALESCE($4, progress),"
        " result = COALESCE($5, result), error = COALESCE($6, error),"
        " attempt = COALESCE($7, attempt), updated_at = now(),"
        " started_at = CASE WHEN $3 <> 'spawning' THEN COALESCE(started_at, now())"
        "              ELSE started_at END,"
        " finished_at = CASE WHEN $3 = ANY($8::text[]) THEN now() ELSE NULL END"
        " WHERE role = 'requester' AND agent_id = $1 AND seq < $2"
        " AND NOT (state = ANY($8::text[]))"
        " RETURNING agent_id, seq, state, progress, error, attempt)"
        " INSERT INTO agent_events (agent_id, seq, state, progress, error, attempt)"
        " SELECT agent_id, seq, state, progress, error, attempt FROM updated",
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
    tell_executor: bool = False,
) -> dict[str, Any] | None:
    """The requester's own final word (its workflow ended): terminal, whatever came before,
    unless a final is there already. Answers the final the row keeps (`written` False when it
    was there before), or None when there is no such row.

    `tell_executor`: this end was decided without the executor's word, so its kill is to be
    delivered: marked `pending` in the same statement (only if this final is the one kept), so
    a delivery that never starts (a workflow terminated right after this record, Temporal away)
    is still started by the reconciler, which walks pending rows."""
    row = await db.fetchrow(
        "WITH updated AS ("
        " UPDATE agents SET state = $2, result = COALESCE($3, result),"
        " error = COALESCE($4, error), updated_at = now(),"
        " finished_at = COALESCE(finished_at, now()),"
        " kill_delivery = CASE WHEN $6 THEN 'pending' ELSE kill_delivery END,"
        " kill_confirmed = CASE WHEN $6 THEN false ELSE kill_confirmed END"
        " WHERE role = 'requester' AND agent_id = $1 AND NOT (state = ANY($5::text[]))"
        " RETURNING agent_id, seq, state, progress, result, error, attempt),"
        " event AS (INSERT INTO agent_events (agent_id, seq, state, progress, error, attempt)"
        " SELECT agent_id, seq, state, progress, error, attempt FROM updated)"
        " SELECT state, result, error, seq, true AS written FROM updated",
        agent_id,
        state,
        result,
        _text(error),
        list(TERMINAL_STATES),
        tell_executor,
    )
    if row is None:
        row = await db.fetchrow(
            "SELECT state, result, error, seq, false AS written FROM agents"
            " WHERE role = 'requester' AND agent_id = $1",
            agent_id,
        )
    return row_dict(row)


async def add_agent_event(db: Executor, agent_id: uuid.UUID, *, seq: int, state: str) -> None:
    await db.execute(
        "INSERT INTO agent_events (agent_id, seq, state) VALUES ($1, $2, $3)", agent_id, seq, state
    )


async def agent_events_after(
    db: Executor, agent_id: uuid.UUID, after_id: int, limit: int = 500
) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT id, seq, state, progress, error, attempt, at FROM agent_events"
        " WHERE agent_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        agent_id,
        after_id,
        limit,
    )
    return [dict(r) for r in rows]


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
    """Change the executor's record and bump its sequence number; terminal states are final.

    A local run's changes also go to its users' event log (agent_events), as a peer's reports
    of a requested run do: its event stream is the same."""
    row = await db.fetchrow(
        "WITH updated AS ("
        " UPDATE agents SET seq = seq + 1, state = COALESCE($3, state),"
        " progress = COALESCE($4, progress), result = COALESCE($5, result),"
        " error = COALESCE($6, error), attempt = COALESCE($7, attempt), updated_at = now(),"
        " started_at = CASE WHEN $3 = 'running' THEN COALESCE(started_at, now())"
        "              ELSE started_at END,"
        " finished_at = CASE WHEN $3 = ANY($8::text[]) THEN now() ELSE finished_at END"
        " WHERE role = 'executor' AND peer_instance_id = $1 AND agent_id = $2"
        " AND NOT (state = ANY($8::text[]))"
        " RETURNING *),"
        " event AS (INSERT INTO agent_events (agent_id, seq, state, progress, error, attempt)"
        " SELECT agent_id, seq, state, progress, error, attempt FROM updated"
        " WHERE peer_instance_id = $9)"
        " SELECT * FROM updated",
        requester_id,
        agent_id,
        state,
        progress,
        result,
        _text(error),
        attempt,
        list(TERMINAL_STATES),
        LOCAL_REQUESTER,
    )
    return row_dict(row)


async def count_running_executed(db: Executor) -> int:
    """Runs this instance executes for any peer that have not ended."""
    value = await db.fetchval(
        "SELECT count(*) FROM agents WHERE role = 'executor' AND NOT (state = ANY($1::text[]))",
        list(TERMINAL_STATES),
    )
    return int(value or 0)


async def count_running_for_peer(db: Executor, requester_id: str) -> int:
    value = await db.fetchval(
        "SELECT count(*) FROM agents WHERE role = 'executor' AND peer_instance_id = $1"
        " AND NOT (state = ANY($2::text[]))",
        requester_id,
        list(TERMINAL_STATES),
    )
    return int(value or 0)


# --- audit --------------------------------------------------------------------------------


def _text(value: str | None) -> str | None:
    """A text column's value made safe by `agents.text`'s rule (PostgreSQL refuses NUL)."""
    return clean(value) if value is not None else None


def _storable(value: Any, limit: int = 2000) -> Any:
    """What a refused peer sent, made fit for text/jsonb: no NUL, no megabyte strings."""
    if isinstance(value, str):
        text = clean(value)
        return text if len(text) <= limit else text[:limit] + "..."
    if isinstance(value, dict):
        return {str(_storable(k, 200)): _storable(v, limit) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_storable(v, limit) for v in value]
    return value


async def audit(
    db: Executor, *, actor: str, action: str, outcome: str = "ok", **details: Any
) -> None:
    # Entries often quote what a refused peer sent: keep them storable whatever it was.
    await db.execute(
        "INSERT INTO audit_log (actor, action, outcome, details) VALUES ($1, $2, $3, $4)",
        _storable(actor, 300),
        _storable(action, 200),
        outcome,
        _storable(details),
    )


# --- trust: peer keys, grants, suspension, audit queries ------------------------------------


async def set_remote_keys(
    db: Executor, connection_id: uuid.UUID, keys: list[dict[str, Any]], *, name: str | None = None
) -> None:
    await db.execute(
        "UPDATE connections SET remote_keys = $2, remote_name = COALESCE($3, remote_name),"
        " keys_refreshed_at = now() WHERE connection_id = $1",
        connection_id,
        keys,
        name,
    )


async def set_grants(
    db: Executor, connection_id: uuid.UUID, grants: dict[str, Any]
) -> dict[str, Any] | None:
    return row_dict(
        await db.fetchrow(
            "UPDATE connections SET grants = $2, updated_at = now()"
            " WHERE connection_id = $1 RETURNING *",
            connection_id,
            grants,
        )
    )


async def list_audit(
    db: Executor,
    *,
    action: str | None = None,
    outcome: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    before: int | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Newest first. `action` ending in '*' matches by prefix."""
    action_prefix = action[:-1] if action is not None and action.endswith("*") else None
    exact = action if action_prefix is None else None
    rows = await db.fetch(
        "SELECT id, at, actor, action, outcome, details FROM audit_log"
        " WHERE ($1::text IS NULL OR action = $1)"
        " AND ($2::text IS NULL OR starts_with(action, $2))"
        " AND ($3::text IS NULL OR outcome = $3) AND ($4::text IS NULL OR actor = $4)"
        " AND ($5::timestamptz IS NULL OR at >= $5) AND ($6::timestamptz IS NULL OR at < $6)"
        " AND ($7::bigint IS NULL OR id < $7)"
        " ORDER BY id DESC LIMIT $8",
        exact,
        action_prefix,
        outcome,
        actor,
        since,
        until,
        before,
        limit,
    )
    return [dict(r) for r in rows]


async def update_connection_state(
    db: Executor,
    connection_id: uuid.UUID,
    *,
    status: str,
    suspended_by: str | None,
    expect_status: str,
    expect_suspended_by: str | None,
) -> dict[str, Any] | None:
    """Compare-and-set of (status, suspended_by); None when the row changed meanwhile."""
    return row_dict(
        await db.fetchrow(
            "UPDATE connections SET status = $2, suspended_by = $3, updated_at = now()"
            " WHERE connection_id = $1 AND status = $4"
            " AND suspended_by IS NOT DISTINCT FROM $5 RETURNING *",
            connection_id,
            status,
            suspended_by,
            expect_status,
            expect_suspended_by,
        )
    )


# --- commands sent by local users ---------------------------------------------------------


async def insert_command(db: Executor, **fields: Any) -> dict[str, Any]:
    columns = list(fields)
    placeholders = ", ".join(f"${i + 1}" for i in range(len(columns)))
    row = await db.fetchrow(
        f"INSERT INTO commands ({', '.join(columns)}) VALUES ({placeholders}) RETURNING *",
        *fields.values(),
    )
    assert row is not None
    return dict(row)


async def get_command(db: Executor, command_id: uuid.UUID) -> dict[str, Any] | None:
    return row_dict(await db.fetchrow("SELECT * FROM commands WHERE command_id = $1", command_id))


async def list_commands(
    db: Executor, *, workspace: str | None, limit: int = 100, offset: int = 0
) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT * FROM commands WHERE ($1::text IS NULL OR workspace = $1)"
        " ORDER BY created_at DESC, command_id LIMIT $2 OFFSET $3",
        workspace,
        limit,
        offset,
    )
    return [dict(r) for r in rows]
