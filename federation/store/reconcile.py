"""Store side of the reconciler: runs still open in the store, and their repair."""

from __future__ import annotations

import uuid
from typing import Any

from federation.states import TERMINAL_STATES
from federation.store.repos import (
    Executor,
    force_requester_final,
    update_executed_agent,
)


async def open_runs(
    db: Executor,
    *,
    after: list[str] | None,
    quiet_seconds: float,
    start_grace: float,
    limit: int,
) -> list[dict]:  # type: ignore[type-arg]
    """Open runs (requester rows whose workflow started, executor rows) not touched lately, in
    key order after the cursor `after` (a previous batch's `cursor_of`; None: from the first).
    `start_overdue` says whether the row is older than `start_grace` seconds. Requester rows
    final here whose kill is still `pending` are walked too (`kill_pending`): their delivery is
    started if it never was, and settled if it ended without settling."""
    role, peer, agent_id = after if after is not None else ("", "", str(uuid.UUID(int=0)))
    rows = await db.fetch(
        "SELECT agent_id, role, peer_instance_id, workflow_id, state, traceparent,"
        " (kill_delivery = 'pending' AND state = ANY($1::text[])) IS TRUE AS kill_pending,"
        " created_at < now() - make_interval(secs => $3) AS start_overdue FROM agents"
        " WHERE (NOT (state = ANY($1::text[])) OR kill_delivery = 'pending')"
        " AND (role = 'executor' OR workflow_started)"
        " AND updated_at < now() - make_interval(secs => $2)"
        " AND (role, peer_instance_id, agent_id) > ($4, $5, $6::uuid)"
        " ORDER BY role, peer_instance_id, agent_id LIMIT $7",
        list(TERMINAL_STATES),
        quiet_seconds,
        start_grace,
        role,
        peer,
        agent_id,
        limit,
    )
    return [dict(r) for r in rows]


def cursor_of(row: dict[str, Any]) -> list[str]:
    """Where a walk of `open_runs` goes on after `row`."""
    return [row["role"], row["peer_instance_id"], str(row["agent_id"])]


async def repair(db: Executor, row: dict[str, Any], *, state: str, error: str) -> bool:
    """Record the final state a closed workflow did not record; False when the run has one
    already (terminal states stay final: the first is kept). A requester's run ended so
    without the executor's word: its kill is marked pending in the same statement, so a
    delivery that cannot start now is started by a later round."""
    agent_id: uuid.UUID = row["agent_id"]
    if row["role"] == "requester":
        kept = await force_requester_final(
            db, agent_id, state=state, result=None, error=error, tell_executor=True
        )
        return bool(kept and kept["written"])
    ended = await update_executed_agent(
        db, row["peer_instance_id"], agent_id, state=state, error=error
    )
    return ended is not None
